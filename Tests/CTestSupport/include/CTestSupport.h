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

/// Sends one Ethernet frame out of `interface` through an AF_PACKET socket; 0 or -errno.
int CTest_send_frame(const char *interface, const unsigned char *frame, unsigned length);

#endif
