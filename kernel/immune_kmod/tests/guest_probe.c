// SPDX-License-Identifier: GPL-2.0
/*
 * guest_probe: the test's hands inside the QEMU guest. Each command does one
 * thing that a hook of the module sees and prints one line saying what the
 * kernel answered, e.g. "RESULT connect pid=42 rc=-1 errno=1".
 *
 *   guest_probe [-u UID] exec PATH [ARG...]
 *   guest_probe [-u UID] connect IPV4 PORT
 *   guest_probe [-u UID] bind PORT
 *   guest_probe [-u UID] open PATH [COUNT]
 *   guest_probe setuid            (setresuid(1000, 1000, 0), then setuid(0))
 *   guest_probe dump              (records of /dev/immune as hex lines)
 *   guest_probe count             (read them all, print how many)
 *   guest_probe drain SECONDS     (read until SECONDS pass with no record,
 *                                  checking that sequence numbers go up)
 *   guest_probe bench open|connect|fork N [PATH]   (ns per operation)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../immune_uapi.h"

static void result(const char *what, int rc, int err)
{
	printf("RESULT %s pid=%d rc=%d errno=%d euid=%d\n", what, getpid(), rc,
	       rc < 0 ? err : 0, (int)geteuid());
	fflush(stdout);
}

static int do_connect(const char *ip, int port)
{
	struct sockaddr_in sa = { .sin_family = AF_INET };
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	int rc;

	sa.sin_port = htons(port);
	inet_pton(AF_INET, ip, &sa.sin_addr);
	rc = connect(fd, (struct sockaddr *)&sa, sizeof(sa));
	result("connect", rc, errno);
	close(fd);
	return 0;
}

static int do_bind(int port)
{
	struct sockaddr_in sa = { .sin_family = AF_INET };
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	int rc;

	sa.sin_port = htons(port);
	sa.sin_addr.s_addr = htonl(INADDR_ANY);
	rc = bind(fd, (struct sockaddr *)&sa, sizeof(sa));
	result("bind", rc, errno);
	close(fd);
	return 0;
}

static int do_setuid(void)
{
	int rc = setresuid(1000, 1000, 0);

	if (rc) {
		result("setresuid", rc, errno);
		return 1;
	}
	rc = setuid(0);
	result("setuid", rc, errno);
	return 0;
}

static int do_dump(int quiet)
{
	unsigned char buf[IMMUNE_RECORD_SIZE * 64];
	int fd = open("/dev/immune", O_RDONLY | O_NONBLOCK);
	ssize_t n, i;
	int count = 0, k;

	if (fd < 0) {
		result("dump", fd, errno);
		return 1;
	}
	while ((n = read(fd, buf, sizeof(buf))) > 0) {
		for (i = 0; i + IMMUNE_RECORD_SIZE <= n;
		     i += IMMUNE_RECORD_SIZE) {
			count++;
			if (quiet)
				continue;
			fputs("REC ", stdout);
			for (k = 0; k < IMMUNE_RECORD_SIZE; k++)
				printf("%02x", buf[i + k]);
			putchar('\n');
		}
	}
	printf("%s %d errno=%d\n", quiet ? "COUNTED" : "DUMPED", count,
	       n < 0 ? errno : 0);
	fflush(stdout);
	close(fd);
	return 0;
}

static long long now_ns(void);

static int do_drain(int seconds)
{
	unsigned char buf[IMMUNE_RECORD_SIZE * 64];
	int fd = open("/dev/immune", O_RDONLY | O_NONBLOCK);
	long long idle = seconds * 1000000000LL, end = now_ns() + idle;
	struct pollfd pfd = { .fd = fd, .events = POLLIN };
	struct immune_record rec;
	__u64 last = 0;
	int count = 0, bad = 0;
	ssize_t n, i;

	if (fd < 0) {
		result("drain", fd, errno);
		return 1;
	}
	while (now_ns() < end) {
		if (poll(&pfd, 1, 100) <= 0)
			continue;
		n = read(fd, buf, sizeof(buf));
		end = now_ns() + idle;
		if (n % IMMUNE_RECORD_SIZE)
			bad++;
		for (i = 0; i + IMMUNE_RECORD_SIZE <= n;
		     i += IMMUNE_RECORD_SIZE) {
			memcpy(&rec, buf + i, sizeof(rec));
			if (rec.seq <= last || rec.version != IMMUNE_RECORD_VERSION)
				bad++;
			last = rec.seq;
			count++;
		}
	}
	printf("DRAINED %d bad=%d\n", count, bad);
	fflush(stdout);
	close(fd);
	return 0;
}

static long long now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* One operation that a hook sees; returns 0 if it went as expected. */
static int bench_once(const char *what, const char *path)
{
	struct sockaddr_in sa = { .sin_family = AF_INET };
	pid_t pid;
	int fd;

	if (!strcmp(what, "open")) {
		fd = open(path, O_RDONLY);
		return fd < 0 ? -1 : close(fd);
	}
	if (!strcmp(what, "connect")) {
		fd = socket(AF_INET, SOCK_STREAM, 0);
		sa.sin_port = htons(8080);
		sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
		connect(fd, (struct sockaddr *)&sa, sizeof(sa));
		return close(fd);
	}
	pid = fork();
	if (pid == 0)
		_exit(0);
	return pid < 0 ? -1 : (waitpid(pid, NULL, 0) == pid ? 0 : -1);
}

static int do_bench(const char *what, long n, const char *path)
{
	long long start;
	long i;

	start = now_ns();
	for (i = 0; i < n; i++) {
		if (bench_once(what, path)) {
			result("bench", -1, errno);
			return 1;
		}
	}
	printf("BENCH %s n=%ld ns_per_op=%lld\n", what, n,
	       (now_ns() - start) / (n ? n : 1));
	fflush(stdout);
	return 0;
}

int main(int argc, char **argv)
{
	int i = 1;
	int fd = -1;

	if (argc > 3 && !strcmp(argv[1], "-u")) {
		int uid = atoi(argv[2]);

		if (setresgid(uid, uid, uid) || setresuid(uid, uid, uid)) {
			perror("setresuid");
			return 2;
		}
		i = 3;
	}
	if (i >= argc)
		return 2;
	if (!strcmp(argv[i], "exec") && i + 1 < argc) {
		fflush(stdout);
		execv(argv[i + 1], argv + i + 1);
		result("exec", -1, errno);
		return 1;
	}
	if (!strcmp(argv[i], "connect") && i + 2 < argc)
		return do_connect(argv[i + 1], atoi(argv[i + 2]));
	if (!strcmp(argv[i], "bind") && i + 1 < argc)
		return do_bind(atoi(argv[i + 1]));
	if (!strcmp(argv[i], "open") && i + 1 < argc) {
		int times = i + 2 < argc ? atoi(argv[i + 2]) : 1;

		while (times-- > 0) {
			fd = open(argv[i + 1], O_RDONLY);
			if (fd >= 0 && times)
				close(fd);
		}
		result("open", fd, errno);
		return 0;
	}
	if (!strcmp(argv[i], "setuid"))
		return do_setuid();
	if (!strcmp(argv[i], "dump"))
		return do_dump(0);
	if (!strcmp(argv[i], "count"))
		return do_dump(1);
	if (!strcmp(argv[i], "drain") && i + 1 < argc)
		return do_drain(atoi(argv[i + 1]));
	if (!strcmp(argv[i], "bench") && i + 2 < argc)
		return do_bench(argv[i + 1], atol(argv[i + 2]),
				i + 3 < argc ? argv[i + 3] : "/etc/passwd");
	fprintf(stderr, "guest_probe: unknown command %s\n", argv[i]);
	return 2;
}
