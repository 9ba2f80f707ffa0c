#ifndef CMALLOCCOUNTER_H
#define CMALLOCCOUNTER_H

/// Allocations (malloc, calloc, realloc, memalign family) made by this process so far.
/// Also built into an LD_PRELOAD library by bench/allocations/run.sh.
/// Only meaningful in an executable that links this target: it interposes glibc's malloc.
unsigned long CMallocCounter_allocations(void);

#endif
