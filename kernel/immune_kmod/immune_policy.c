// SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause
/*
 * IMMUNE policy core: matching of paths, command lines and ports.
 *
 * No library calls and no allocation: the same file builds in the Linux
 * kernel, the DragonFlyBSD kernel and user space (tests and fuzzing).
 */
#include "immune_policy.h"

static const char *const default_exec_dirs[] = {
	"/tmp/", "/dev/shm/", "/var/tmp/",
};

static const char *const default_patterns[] = {
	"nc ", "ncat", "/dev/tcp", "bash -i", "python -c", "perl -e",
	"ruby -e", "| sh", "wget ", "curl ",
};

static const char *const default_files[] = {
	"/etc/shadow", "/etc/gshadow", "/etc/master.passwd", "/etc/passwd",
	"/etc/sudoers", ".ssh/id_rsa", ".ssh/id_ed25519", ".ssh/id_ecdsa",
	".ssh/authorized_keys",
};

static const unsigned short default_ports[] = {
	4444, 5555, 6666, 31337, 12345,
};

#define ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

size_t imm_strnlen(const char *s, size_t max)
{
	size_t n = 0;

	while (n < max && s[n])
		n++;
	return n;
}

static void copy_bytes(char *dst, const char *src, size_t len)
{
	size_t i;

	for (i = 0; i < len; i++)
		dst[i] = src[i];
}

static int same_bytes(const char *a, const char *b, size_t len)
{
	size_t i;

	for (i = 0; i < len; i++)
		if (a[i] != b[i])
			return 0;
	return 1;
}

static void list_set(struct imm_list *l, const char *const *items, size_t n)
{
	size_t i, len;

	l->count = 0;
	for (i = 0; i < n && i < IMM_MAX_ITEMS; i++) {
		len = imm_strnlen(items[i], IMM_ITEM_LEN - 1);
		copy_bytes(l->item[i], items[i], len);
		l->item[i][len] = '\0';
		l->len[i] = (unsigned char)len;
		l->count++;
	}
}

void imm_policy_defaults(struct imm_policy *p)
{
	size_t i;

	p->enabled = 1;
	p->block_mode = 0;
	p->monitor_network = 1;
	p->monitor_files = 1;
	p->monitor_credentials = 1;
	p->log_level = 1;
	list_set(&p->exec_dirs, default_exec_dirs,
		 ARRAY_LEN(default_exec_dirs));
	list_set(&p->patterns, default_patterns, ARRAY_LEN(default_patterns));
	list_set(&p->files, default_files, ARRAY_LEN(default_files));
	p->nports = 0;
	for (i = 0; i < ARRAY_LEN(default_ports); i++)
		p->ports[p->nports++] = default_ports[i];
}

int imm_list_parse(struct imm_list *out, const char *text, size_t len)
{
	size_t start = 0, end, i;
	unsigned int count = 0;

	/* A first pass validates, so that *out changes only on success. */
	for (i = 0; i < len; i++)
		if (text[i] == '\0')
			return -IMM_EINVAL;
	while (start < len) {
		end = start;
		while (end < len && text[end] != '\n')
			end++;
		if (end > start) {
			if (count == IMM_MAX_ITEMS || end - start >= IMM_ITEM_LEN)
				return -IMM_E2BIG;
			count++;
		}
		start = end + 1;
	}
	out->count = 0;
	start = 0;
	while (start < len) {
		end = start;
		while (end < len && text[end] != '\n')
			end++;
		if (end > start) {
			copy_bytes(out->item[out->count], text + start,
				   end - start);
			out->item[out->count][end - start] = '\0';
			out->len[out->count] = (unsigned char)(end - start);
			out->count++;
		}
		start = end + 1;
	}
	return (int)count;
}

static int is_port_sep(char c)
{
	return c == ',' || c == ' ' || c == '\n' || c == '\t';
}

int imm_ports_parse(unsigned short *ports, unsigned int *nports,
		    const char *text, size_t len)
{
	unsigned short tmp[IMM_MAX_PORTS];
	unsigned int count = 0, i;
	unsigned long value;
	size_t pos = 0, digits;

	while (pos < len) {
		if (is_port_sep(text[pos])) {
			pos++;
			continue;
		}
		value = 0;
		digits = 0;
		while (pos < len && !is_port_sep(text[pos])) {
			if (text[pos] < '0' || text[pos] > '9')
				return -IMM_EINVAL;
			value = value * 10 + (unsigned long)(text[pos] - '0');
			if (value > 65535)
				return -IMM_EINVAL;
			digits++;
			pos++;
		}
		if (!digits || value == 0)
			return -IMM_EINVAL;
		if (count == IMM_MAX_PORTS)
			return -IMM_E2BIG;
		tmp[count++] = (unsigned short)value;
	}
	for (i = 0; i < count; i++)
		ports[i] = tmp[i];
	*nports = count;
	return (int)count;
}

static size_t put_bytes(char *buf, size_t size, size_t pos, const char *s,
			size_t len)
{
	size_t i;

	for (i = 0; i < len && pos + 1 < size; i++)
		buf[pos++] = s[i];
	return pos;
}

size_t imm_list_format(const struct imm_list *l, char *buf, size_t size)
{
	size_t pos = 0;
	unsigned int i;

	if (!size)
		return 0;
	for (i = 0; i < l->count; i++) {
		pos = put_bytes(buf, size, pos, l->item[i], l->len[i]);
		pos = put_bytes(buf, size, pos, "\n", 1);
	}
	buf[pos] = '\0';
	return pos;
}

size_t imm_ports_format(const unsigned short *ports, unsigned int nports,
			char *buf, size_t size)
{
	char num[6];
	size_t pos = 0, n;
	unsigned int i, v;

	if (!size)
		return 0;
	for (i = 0; i < nports; i++) {
		v = ports[i];
		n = sizeof(num);
		do {
			num[--n] = (char)('0' + v % 10);
			v /= 10;
		} while (v && n);
		if (i)
			pos = put_bytes(buf, size, pos, ",", 1);
		pos = put_bytes(buf, size, pos, num + n, sizeof(num) - n);
	}
	pos = put_bytes(buf, size, pos, "\n", 1);
	buf[pos] = '\0';
	return pos;
}

int imm_match_exec_dir(const struct imm_policy *p, const char *path,
		       size_t len)
{
	const struct imm_list *l = &p->exec_dirs;
	unsigned int i;

	for (i = 0; i < l->count; i++)
		if (l->len[i] <= len && same_bytes(path, l->item[i], l->len[i]))
			return (int)i;
	return -1;
}

static int is_word_char(char c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
	       (c >= '0' && c <= '9');
}

static int starts_word(const char *cmd, size_t at)
{
	char c;

	if (!at)
		return 1;
	c = cmd[at - 1];
	return c == ' ' || c == '/' || c == '|' || c == ';' || c == '&' ||
	       c == '(' || c == '`' || c == '\t';
}

int imm_match_pattern(const struct imm_policy *p, const char *cmd,
		      size_t len)
{
	const struct imm_list *l = &p->patterns;
	unsigned int i;
	size_t at, plen;

	for (i = 0; i < l->count; i++) {
		plen = l->len[i];
		if (!plen || plen > len)
			continue;
		for (at = 0; at + plen <= len; at++) {
			if (cmd[at] != l->item[i][0])
				continue;
			if (is_word_char(cmd[at]) && !starts_word(cmd, at))
				continue;
			if (same_bytes(cmd + at, l->item[i], plen))
				return (int)i;
		}
	}
	return -1;
}

int imm_port_blocked(const struct imm_policy *p, unsigned int port)
{
	unsigned int i;

	for (i = 0; i < p->nports && i < IMM_MAX_PORTS; i++)
		if (p->ports[i] == port)
			return 1;
	return 0;
}

int imm_match_file(const struct imm_policy *p, const char *path, size_t len)
{
	const struct imm_list *l = &p->files;
	unsigned int i;
	size_t elen;

	for (i = 0; i < l->count; i++) {
		elen = l->len[i];
		if (!elen || elen > len)
			continue;
		if (l->item[i][0] == '/') {
			if (elen == len && same_bytes(path, l->item[i], len))
				return (int)i;
			continue;
		}
		if (elen < len && path[len - elen - 1] == '/' &&
		    same_bytes(path + len - elen, l->item[i], elen))
			return (int)i;
	}
	return -1;
}

int imm_file_candidate(const struct imm_policy *p, const char *name,
		       size_t len)
{
	const struct imm_list *l = &p->files;
	unsigned int i;
	size_t elen, base;

	for (i = 0; i < l->count; i++) {
		elen = l->len[i];
		base = elen;
		while (base > 0 && l->item[i][base - 1] != '/')
			base--;
		if (elen - base == len &&
		    same_bytes(l->item[i] + base, name, len))
			return 1;
	}
	return 0;
}

int imm_priv_port_by_user(unsigned int port, unsigned int euid)
{
	return port > 0 && port < 1024 && euid != 0;
}

int imm_to_root(unsigned int old_euid, unsigned int new_euid)
{
	return old_euid != 0 && new_euid == 0;
}
