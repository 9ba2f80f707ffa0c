#define _GNU_SOURCE
#include "CLinux.h"

#include <errno.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

int CLinux_allowed_cpus(int *cpus, int capacity) {
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof(set), &set) != 0) return -1;
    int count = 0;
    for (int cpu = 0; cpu < CPU_SETSIZE && count < capacity; cpu++) {
        if (CPU_ISSET(cpu, &set)) cpus[count++] = cpu;
    }
    return count;
}

int CLinux_pin_current_thread(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    return sched_setaffinity(0, sizeof(set), &set) == 0 ? 0 : -errno;
}

int CLinux_eventfd(void) {
    int fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    return fd >= 0 ? fd : -errno;
}

#include <linux/tcp.h>
#include <netinet/in.h>
#include <stdint.h>
#include <sys/socket.h>

unsigned CLinux_tcp_ms_since_progress(int fd) {
    struct tcp_info info;
    socklen_t length = sizeof(info);
    if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &length) != 0) return UINT32_MAX;
    // Data sent (new or retransmitted) and an acknowledgement received: a reader that
    // reads nothing gets only window probes (no data); a peer that is gone acknowledges
    // nothing. The older of the two is when the peer last took data.
    return info.tcpi_last_data_sent > info.tcpi_last_ack_recv ? info.tcpi_last_data_sent : info.tcpi_last_ack_recv;
}

int CLinux_set_current_thread_nice(int nice) {
    pid_t tid = (pid_t)syscall(SYS_gettid);
    return setpriority(PRIO_PROCESS, (id_t)tid, nice) == 0 ? 0 : -errno;
}

int CLinux_set_thread_idle(int tid, int idle, int nice) {
    struct sched_param param = { .sched_priority = 0 };
    if (sched_setscheduler(tid, idle ? SCHED_IDLE : SCHED_OTHER, &param) != 0) return -errno;
    if (!idle && setpriority(PRIO_PROCESS, (id_t)tid, nice) != 0) return -errno;
    return 0;
}

int CLinux_current_thread_id(void) {
    return (int)syscall(SYS_gettid);
}
