/* An LD_PRELOAD library that makes melt 7.12 hang before its first frame, as it does by
   itself now and then on a busy machine.

   MLT's avformat consumer starts its thread, then marks itself running. When the thread
   checks first, it finds the consumer not running: it closes an empty output and ends, and
   melt waits forever for a consumer that is marked running but has no thread. Holding up the
   thread that starts the consumer's (right after pthread_create) opens that window every time.

   MELT_SLOWSTART_ONCE=<path>: hold up only a melt that creates <path> (the first one);
   one that finds it there runs normally. Unset: every melt hangs.
   MELT_SLOWSTART_US: how long (microseconds, default 500000). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef int (*create_fn)(pthread_t *, const pthread_attr_t *, void *(*)(void *), void *);

static int held;

/* The consumer's thread runs code of MLT's avformat module; other threads (FFmpeg's, MLT's
   own, those of other programs started with this library) are left alone. */
static int avformat_consumer(void *(*start)(void *)) {
    Dl_info info;
    return dladdr((void *)start, &info) && info.dli_fname != NULL
        && strstr(info.dli_fname, "mltavformat") != NULL;
}

static int this_run(void) {
    const char *once = getenv("MELT_SLOWSTART_ONCE");
    if (once == NULL || *once == '\0')
        return 1;
    int fd = open(once, O_WRONLY | O_CREAT | O_EXCL, 0644);
    if (fd < 0)
        return 0;
    close(fd);
    return 1;
}

int pthread_create(pthread_t *thread, const pthread_attr_t *attr, void *(*start)(void *),
                   void *arg) {
    static create_fn real;
    if (real == NULL)
        real = (create_fn)dlsym(RTLD_NEXT, "pthread_create");
    int rc = real(thread, attr, start, arg);
    if (rc == 0 && avformat_consumer(start) && __sync_fetch_and_add(&held, 1) == 0
            && this_run()) {
        const char *delay = getenv("MELT_SLOWSTART_US");
        usleep(delay != NULL && *delay != '\0' ? (useconds_t)atol(delay) : 500000);
    }
    return rc;
}
