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

#endif
