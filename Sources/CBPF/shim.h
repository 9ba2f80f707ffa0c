#ifndef CBPF_SHIM_H
#define CBPF_SHIM_H

// No _GNU_SOURCE, as in CURing's shim: glibc headers parsed with it differ from Swift's
// Glibc module (fd_set), which the importer rejects. libbpf needs nothing it adds.
#include <features.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <errno.h>
#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <linux/if_link.h>
#include <net/if.h>
#include <sys/mount.h>
#include <sys/vfs.h>

#include "../../bpf/xdp_filter.h"
#include "../../bpf/udp_relay.h"
#include "../../bpf/kernel_relay.h"

/* libbpf's option structs are sized by their LIBBPF_OPTS macro, which Swift cannot use. */

static inline struct bpf_object *l4lb_bpf_open_mem(const void *buffer, size_t size, const char *pin_root)
{
	LIBBPF_OPTS(bpf_object_open_opts, opts, .pin_root_path = pin_root, .object_name = "l4lb_xdp_filter");
	return bpf_object__open_mem(buffer, size, &opts);
}

/* An object whose maps are not pinned: they live as long as the process holds them. */
static inline struct bpf_object *l4lb_bpf_open_mem_unpinned(const void *buffer, size_t size, const char *name)
{
	LIBBPF_OPTS(bpf_object_open_opts, opts, .object_name = name);
	return bpf_object__open_mem(buffer, size, &opts);
}

/* A tcx link (kernel 6.6+) running `prog_fd` on `ifindex`'s ingress after the programs
 * already there. The attach type postdates this libbpf's headers; libbpf passes it on. */
#define L4LB_BPF_TCX_INGRESS 46
static inline int l4lb_tcx_ingress_link_create(int prog_fd, int ifindex)
{
	return bpf_link_create(prog_fd, ifindex, (enum bpf_attach_type)L4LB_BPF_TCX_INGRESS, NULL);
}

/* Runs a program once on `packet` (BPF_PROG_TEST_RUN): its return value and the packet
 * as it left, in `out` (`*out_size` in: room, out: length). 0 or a negative errno. */
static inline int l4lb_prog_test_run(int prog_fd, const void *packet, __u32 size, void *out, __u32 *out_size, __u32 *retval)
{
	LIBBPF_OPTS(bpf_test_run_opts, opts, .data_in = packet, .data_size_in = size, .data_out = out, .data_size_out = *out_size, .repeat = 1);
	int err = bpf_prog_test_run_opts(prog_fd, &opts);
	if (err)
		return err;
	*out_size = opts.data_size_out;
	*retval = opts.retval;
	return 0;
}

/* An array of `entries` u32 words that can be an inner map of an ARRAY_OF_MAPS whose
 * template has BPF_F_INNER_MAP (so sizes may differ); its fd or a negative errno. */
static inline int l4lb_inner_array_create(__u32 entries)
{
	LIBBPF_OPTS(bpf_map_create_opts, opts, .map_flags = BPF_F_INNER_MAP);
	return bpf_map_create(BPF_MAP_TYPE_ARRAY, "l4lb_kr_plan", sizeof(__u32), sizeof(__u32), entries, &opts);
}

static inline int l4lb_xdp_link_create(int prog_fd, int ifindex, __u32 flags)
{
	LIBBPF_OPTS(bpf_link_create_opts, opts, .flags = flags);
	return bpf_link_create(prog_fd, ifindex, BPF_XDP, &opts);
}

static inline int l4lb_xdp_link_update(int link_fd, int prog_fd)
{
	return bpf_link_update(link_fd, prog_fd, NULL);
}

/* The attach mode (XDP_ATTACHED_*) and program id on an interface, 0 when none. */
static inline int l4lb_xdp_query(int ifindex, __u8 *mode, __u32 *prog_id)
{
	LIBBPF_OPTS(bpf_xdp_query_opts, opts);
	int err = bpf_xdp_query(ifindex, 0, &opts);
	if (err)
		return err;
	*mode = opts.attach_mode;
	*prog_id = opts.prog_id;
	return 0;
}

/* The ifindex an XDP link is attached to, or a negative errno. */
static inline int l4lb_link_ifindex(int link_fd, __u32 *prog_id)
{
	struct bpf_link_info info = {0};
	__u32 length = sizeof(info);
	int err = bpf_obj_get_info_by_fd(link_fd, &info, &length);
	if (err)
		return err;
	*prog_id = info.prog_id;
	return info.type == BPF_LINK_TYPE_XDP ? (int)info.xdp.ifindex : -EINVAL;
}

static inline int l4lb_prog_id(int prog_fd)
{
	struct bpf_prog_info info = {0};
	__u32 length = sizeof(info);
	int err = bpf_obj_get_info_by_fd(prog_fd, &info, &length);
	return err ? err : (int)info.id;
}

#define L4LB_BPF_FS_MAGIC 0xcafe4a11

#endif
