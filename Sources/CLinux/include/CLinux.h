#ifndef CLINUX_H
#define CLINUX_H

// Linux calls that glibc declares only under _GNU_SOURCE, wrapped with plain types so the
// header can be imported next to Swift's Glibc module (see Sources/CURing/shim.h).

/// Fills `cpus` with the CPUs in this process's affinity mask; returns how many, or -1.
int CLinux_allowed_cpus(int *cpus, int capacity);

/// Pins the calling thread to one CPU; 0 or -errno.
int CLinux_pin_current_thread(int cpu);

/// Sets the calling thread's nice value (Linux schedules threads apart); 0 or -errno.
int CLinux_set_current_thread_nice(int nice);
/// Moves thread `tid` (0: the caller) to SCHED_IDLE (idle = 1), or back to SCHED_OTHER at
/// nice value `nice` (idle = 0); 0 or -errno (EPERM leaving SCHED_IDLE without CAP_SYS_NICE).
int CLinux_set_thread_idle(int tid, int idle, int nice);
/// The calling thread's kernel id.
int CLinux_current_thread_id(void);

/// A non-blocking, close-on-exec eventfd, or -errno.
int CLinux_eventfd(void);

/// Milliseconds since this TCP socket's peer last took data: the older of TCP_INFO's
/// tcpi_last_data_sent (data, not window probes) and tcpi_last_ack_recv; UINT32_MAX when
/// unknown.
unsigned CLinux_tcp_ms_since_progress(int fd);

#endif
