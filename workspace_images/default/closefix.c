/*
 * libden-closefix.so: preloaded into tmux (by /usr/local/bin/tmux and den-init) in Den's image.
 *
 * gVisor (runsc 20240729) grows a process's descriptor table up to the number given to close(),
 * even when nothing is open there, and the sandbox does not give that memory back after the
 * process exits: about 35 MB per call. tmux's client calls close(INT_MAX) on every run (its
 * getptmfd() is INT_MAX on Linux), so every `tmux attach`, `tmux ls` and web terminal
 * connection cost the sandbox 35 MB, and about twenty of them got a 512 MB workspace
 * OOM-killed. A descriptor that high cannot be open (Linux caps descriptors at fs.nr_open,
 * 1048576 by default), so answering EBADF without the system call is what Linux answers.
 */
#include <errno.h>
#include <string.h>

#define FD_CEILING (1 << 20)
#define OWN_ENTRY "LD_PRELOAD=/usr/local/lib/den/libden-closefix.so"

extern int __close(int fd);

int close(int fd)
{
    if (fd >= FD_CEILING) {
        errno = EBADF;
        return -1;
    }
    return __close(fd);
}

/*
 * Only tmux itself needs this library: take its LD_PRELOAD entry out of the environment (glibc
 * passes envp to constructors, and it is environ), so the tmux server does not hand it on to
 * every shell it starts.
 */
__attribute__((constructor))
static void drop_own_preload(int argc, char **argv, char **envp)
{
    char **out = envp;

    (void)argc;
    (void)argv;
    if (envp == NULL)
        return;
    for (char **p = envp; *p != NULL; p++) {
        if (strcmp(*p, OWN_ENTRY) != 0)
            *out++ = *p;
    }
    *out = NULL;
}
