// Built with ../../Sources/CMallocCounter/CMallocCounter.c into an LD_PRELOAD library
// (bench/allocations/run.sh): prints the process's allocation count at exit. valgrind
// 3.19 cannot run the Swift 6 binary, so this is how allocations per connection are
// measured.
#include <stdio.h>
#include <unistd.h>

#include "CMallocCounter.h"

__attribute__((destructor)) static void report(void) {
    char line[64];
    int len = snprintf(line, sizeof line, "malloc_count: %lu\n", CMallocCounter_allocations());
    if (len > 0) (void)!write(2, line, (size_t)len);
}
