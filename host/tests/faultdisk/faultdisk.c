/*
 * faultdisk: an LD_PRELOAD shim that makes a real waxosd's disk misbehave, from outside its
 * code. It wraps fdatasync, fsync and write for files whose path contains FAULTDISK_PATH
 * (e.g. "/wal/"); other files are untouched.
 *
 *   FAULTDISK_PATH   substring of the path of the files to fault (required; unset: no faults)
 *   FAULTDISK_AFTER  how many matching syncs succeed before faults start (default 0)
 *   FAULTDISK_MODE   eio                 syncs fail with EIO (the page cache keeps the data)
 *                    stall-while:<file>  syncs block while <file> exists, then go through
 *                    short-writes        every write writes at most half of what it is given
 *
 * Built by the tests with `cc -shared -fPIC` (host/tests/common: faultdisk_shim()).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static long syncs_seen;

static int matches(int fd) {
    const char *pattern = getenv("FAULTDISK_PATH");
    if (pattern == NULL || *pattern == 0) return 0;
    char link[64], target[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, target, sizeof target - 1);
    if (n < 0) return 0;
    target[n] = 0;
    return strstr(target, pattern) != NULL;
}

static const char *mode(void) {
    const char *m = getenv("FAULTDISK_MODE");
    return m ? m : "";
}

/* 0: go on with the real call; -1: fail it with EIO. */
static int sync_fault(int fd) {
    if (!matches(fd)) return 0;
    long after = getenv("FAULTDISK_AFTER") ? atol(getenv("FAULTDISK_AFTER")) : 0;
    long n = __atomic_add_fetch(&syncs_seen, 1, __ATOMIC_SEQ_CST);
    if (n <= after) return 0;
    const char *m = mode();
    if (strcmp(m, "eio") == 0) {
        errno = EIO;
        return -1;
    }
    if (strncmp(m, "stall-while:", 12) == 0) {
        struct stat st;
        struct timespec tick = {0, 10 * 1000 * 1000};
        while (stat(m + 12, &st) == 0) nanosleep(&tick, NULL);
    }
    return 0;
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    if (sync_fault(fd) < 0) return -1;
    return real(fd);
}

int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    if (sync_fault(fd) < 0) return -1;
    return real(fd);
}

ssize_t write(int fd, const void *buf, size_t count) {
    static ssize_t (*real)(int, const void *, size_t);
    if (!real) real = (ssize_t(*)(int, const void *, size_t))dlsym(RTLD_NEXT, "write");
    if (count > 1 && strcmp(mode(), "short-writes") == 0 && matches(fd)) count = count / 2;
    return real(fd, buf, count);
}
