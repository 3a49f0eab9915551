#ifndef CLIBPQ_SHIM_H
#define CLIBPQ_SHIM_H
#include <libpq-fe.h>
#ifdef __linux__
/* PoolKit's reactor waits on libpq sockets with epoll; Glibc's Swift module does not export it. */
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <spawn.h>
/* glibc >= 2.34 has these, but only declares them under _GNU_SOURCE. EmbeddedPostgres uses them so
   that the long-lived server it starts inherits none of the test process's descriptors. */
extern int posix_spawn_file_actions_addclosefrom_np(posix_spawn_file_actions_t *actions, int from);
extern int posix_spawn_file_actions_addchdir_np(posix_spawn_file_actions_t *actions, const char *path);
/* EmbeddedPostgres's watchdog runs in a session of its own (glibc >= 2.26; declared only
   under _GNU_SOURCE). */
#define CLIBPQ_POSIX_SPAWN_SETSID 0x80
/* Names PoolKit's reactor threads (glibc; declared only under _GNU_SOURCE). */
#include <pthread.h>
extern int pthread_setname_np(pthread_t thread, const char *name);
/* EmbeddedPostgres holds the server's process by a pidfd while it stops it (Linux >= 5.3), so that
   a pid reused meanwhile is never signalled; -1 with errno ENOSYS where the call is missing. */
#include <errno.h>
#include <sys/syscall.h>
#include <unistd.h>
static inline int clibpq_pidfd_open(int pid) {
#ifdef SYS_pidfd_open
    return (int)syscall(SYS_pidfd_open, pid, 0);
#else
    errno = ENOSYS;
    return -1;
#endif
}
static inline int clibpq_pidfd_send_signal(int pidfd, int sig) {
#ifdef SYS_pidfd_send_signal
    return (int)syscall(SYS_pidfd_send_signal, pidfd, sig, (void *)0, 0);
#else
    errno = ENOSYS;
    return -1;
#endif
}
/* The calling thread's CPU, for the pool's CPU-local cache (glibc; declared only under _GNU_SOURCE). */
extern int sched_getcpu(void);
#endif
/* The CPU's time-stamp counter (x86-64; 0 elsewhere): PoolKit times a connection's use with it when
   the kernel itself keeps time by it (clocksource "tsc"), for half the cost of clock_gettime. */
static inline unsigned long long clibpq_ticks(void) {
#if defined(__x86_64__)
    unsigned int lo, hi;
    __asm__ __volatile__("rdtsc" : "=a"(lo), "=d"(hi));
    return ((unsigned long long)hi << 32) | lo;
#else
    return 0;
#endif
}
#endif
