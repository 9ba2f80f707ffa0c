#define _GNU_SOURCE
#include "CTestSupport.h"
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <linux/ethtool.h>
#include <linux/if_packet.h>
#include <linux/sockios.h>
#include <sys/ioctl.h>
#include <sched.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

int CTest_epoll_create(void) {
    int fd = epoll_create1(EPOLL_CLOEXEC);
    return fd < 0 ? -errno : fd;
}

int CTest_epoll_add(int epfd, int fd, unsigned events) {
    struct epoll_event event = { .events = events, .data = { .fd = fd } };
    return epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &event) < 0 ? -errno : 0;
}

int CTest_epoll_wait(int epfd, int *fds, unsigned *events, int max, int timeout_ms) {
    struct epoll_event ready[256];
    if (max > 256) max = 256;
    int n = epoll_wait(epfd, ready, max, timeout_ms);
    if (n < 0) return -errno;
    for (int i = 0; i < n; i++) {
        fds[i] = ready[i].data.fd;
        events[i] = ready[i].events;
    }
    return n;
}

int CTest_enter_netns(const char *path) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -errno;
    int rc = setns(fd, CLONE_NEWNET);
    int saved = errno;
    close(fd);
    return rc < 0 ? -saved : 0;
}

int CTest_send_frames(const char *interface, const unsigned char *frames, unsigned length, unsigned count) {
    unsigned index = if_nametoindex(interface);
    if (index == 0) return -errno;
    int fd = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, 0);
    if (fd < 0) return -errno;
    struct sockaddr_ll address;
    memset(&address, 0, sizeof(address));
    address.sll_family = AF_PACKET;
    address.sll_ifindex = (int)index;
    address.sll_halen = 6;
    int rc = 0;
    // A burst can fill the socket's send buffer or the device's queue (ENOBUFS): the
    // frame is sent again once it drains, backing off 1 ms at a time for at most 5 s.
    unsigned waited = 0;
    unsigned i = 0;
    while (i < count && rc == 0) {
        const unsigned char *frame = frames + (size_t)i * length;
        memcpy(address.sll_addr, frame, 6);
        ssize_t sent = sendto(fd, frame, length, 0, (struct sockaddr *)&address, sizeof(address));
        if (sent < 0 && (errno == ENOBUFS || errno == EAGAIN) && waited < 5000) {
            struct timespec pause = { .tv_sec = 0, .tv_nsec = 1000000 };
            nanosleep(&pause, NULL);
            waited++;
            continue;
        }
        if (sent != (ssize_t)length) rc = -(sent < 0 ? errno : EMSGSIZE);
        i++;
    }
    close(fd);  // closing a packet socket waits for an RCU grace period: one per batch
    return rc;
}

long CTest_send_from(int fd, unsigned source, unsigned destination, unsigned short port, const void *payload, unsigned length) {
    struct sockaddr_in to = { .sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = destination };
    struct iovec iov = { .iov_base = (void *)payload, .iov_len = length };
    union { char buffer[CMSG_SPACE(sizeof(struct in_pktinfo))]; struct cmsghdr align; } control;
    memset(&control, 0, sizeof(control));
    struct msghdr message = {
        .msg_name = &to, .msg_namelen = sizeof(to), .msg_iov = &iov, .msg_iovlen = 1,
        .msg_control = control.buffer, .msg_controllen = sizeof(control.buffer),
    };
    struct cmsghdr *header = CMSG_FIRSTHDR(&message);
    header->cmsg_level = IPPROTO_IP;
    header->cmsg_type = IP_PKTINFO;
    header->cmsg_len = CMSG_LEN(sizeof(struct in_pktinfo));
    struct in_pktinfo *info = (struct in_pktinfo *)CMSG_DATA(header);
    info->ipi_spec_dst.s_addr = source;
    long sent = sendmsg(fd, &message, 0);
    return sent < 0 ? -errno : sent;
}

int CTest_set_tx_checksum(const char *interface, int on) {
    struct ethtool_value value = { .cmd = ETHTOOL_STXCSUM, .data = on ? 1 : 0 };
    struct ifreq request;
    memset(&request, 0, sizeof(request));
    strncpy(request.ifr_name, interface, IFNAMSIZ - 1);
    request.ifr_data = (void *)&value;
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -errno;
    int rc = ioctl(fd, SIOCETHTOOL, &request);
    int saved = errno;
    close(fd);
    return rc < 0 ? -saved : 0;
}
