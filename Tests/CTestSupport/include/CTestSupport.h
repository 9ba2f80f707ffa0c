#ifndef CTESTSUPPORT_H
#define CTESTSUPPORT_H

// epoll for the end-to-end tests' hostile peers, which hold thousands of stalled sockets;
// Swift's Glibc module does not export <sys/epoll.h>.

/// A close-on-exec epoll instance, or -errno.
int CTest_epoll_create(void);

/// Adds `fd` with `events` (EPOLL* bits, as the kernel defines them); 0 or -errno.
int CTest_epoll_add(int epfd, int fd, unsigned events);

/// Waits up to `timeout_ms`; fills `fds` and `events` for up to `max` ready sockets and
/// returns how many, or -errno.
int CTest_epoll_wait(int epfd, int *fds, unsigned *events, int max, int timeout_ms);

// Network namespaces and raw frames for the filter tests.

/// Moves the calling thread into the network namespace at `path` (/run/netns/NAME); 0 or
/// -errno. Sockets and processes the thread creates afterwards live in that namespace.
int CTest_enter_netns(const char *path);

/// Sends `count` Ethernet frames of `length` bytes each, back to back in `frames`, out of
/// `interface` through one AF_PACKET socket; 0 or -errno.
int CTest_send_frames(const char *interface, const unsigned char *frames, unsigned length, unsigned count);

// Many UDP clients from one socket, for the session-scale tests.

/// Sends `payload` from the IPv4 socket `fd` (bound to 0.0.0.0) to `destination`:`port`,
/// with the local source address `source` (network order) chosen by IP_PKTINFO; the
/// number of bytes sent, or -errno. All of 127.0.0.0/8 is local on lo.
long CTest_send_from(int fd, unsigned source, unsigned destination, unsigned short port, const void *payload, unsigned length);

/// Turns `interface`'s transmit checksum offload on or off (ETHTOOL_STXCSUM, as `ethtool
/// -K IF tx off`), in the calling thread's namespace; 0 or -errno. Off, the stack sends
/// full checksums (CHECKSUM_NONE) instead of CHECKSUM_PARTIAL, and a veth peer verifies
/// them on receipt.
int CTest_set_tx_checksum(const char *interface, int on);

#endif
