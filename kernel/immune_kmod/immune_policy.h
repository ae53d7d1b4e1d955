/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * IMMUNE policy core: what the module decides, apart from how it hooks.
 *
 * Pure C with no library calls, shared by the Linux module (immune_main.c),
 * the DragonFlyBSD glue (dragonfly/immune_dfly.c) and the user-space tests.
 * Every string comes with its length; nothing here reads past it or needs a
 * terminating NUL. The caller serialises access to a struct imm_policy.
 */
#ifndef IMMUNE_POLICY_H
#define IMMUNE_POLICY_H

#if defined(__KERNEL__)
#include <linux/types.h>
#elif defined(_KERNEL)
#include <sys/types.h>
#else
#include <stddef.h>
#endif

#define IMM_MAX_ITEMS	32
#define IMM_ITEM_LEN	120
#define IMM_MAX_PORTS	32

/* Record kinds (struct immune_record.kind). */
enum imm_kind {
	IMM_KIND_EXEC = 1,
	IMM_KIND_FORK = 2,
	IMM_KIND_CONNECT = 3,
	IMM_KIND_BIND = 4,
	IMM_KIND_OPEN = 5,
	IMM_KIND_SETUID = 6,
};

/* Severities, as in immune.events.SEVERITIES. */
enum imm_severity {
	IMM_SEV_INFO = 0,
	IMM_SEV_LOW = 1,
	IMM_SEV_MEDIUM = 2,
	IMM_SEV_HIGH = 3,
	IMM_SEV_CRITICAL = 4,
};

/* Why a record is a threat (struct immune_record.reason, a bit mask). */
#define IMM_R_EXEC_DIR		0x0001	/* executable under a blocked dir */
#define IMM_R_PATTERN		0x0002	/* command line matches a pattern */
#define IMM_R_PORT		0x0004	/* a blocked port */
#define IMM_R_FILE		0x0008	/* a sensitive file */
#define IMM_R_PRIV_PORT		0x0010	/* privileged port bound by non-root */
#define IMM_R_TO_ROOT		0x0020	/* euid from non-root to root */

/* One list of strings: blocked exec dirs, patterns or sensitive files. */
struct imm_list {
	unsigned int count;
	unsigned char len[IMM_MAX_ITEMS];
	char item[IMM_MAX_ITEMS][IMM_ITEM_LEN];
};

struct imm_policy {
	int enabled;
	int block_mode;
	int monitor_network;
	int monitor_files;
	int monitor_credentials;
	int log_level;		/* 0 quiet, 1 threats, 2 every record */
	struct imm_list exec_dirs;
	struct imm_list patterns;
	struct imm_list files;
	unsigned int nports;
	unsigned short ports[IMM_MAX_PORTS];
};

/* Errors of the parsers (negated, as the kernel's errno values). */
#define IMM_EINVAL	22
#define IMM_E2BIG	7

void imm_policy_defaults(struct imm_policy *p);

/*
 * Parse a list written by user space: items separated by newlines (a
 * trailing newline is fine, empty lines are skipped). Returns the number of
 * items, or -IMM_E2BIG if there are more than IMM_MAX_ITEMS or one is
 * IMM_ITEM_LEN bytes or longer, or -IMM_EINVAL for a NUL byte. On error
 * *out is left unchanged.
 */
int imm_list_parse(struct imm_list *out, const char *text, size_t len);

/*
 * Parse ports separated by commas, spaces or newlines, each 1..65535 in
 * decimal. Returns the count, -IMM_EINVAL (not a port) or -IMM_E2BIG.
 */
int imm_ports_parse(unsigned short *ports, unsigned int *nports,
		    const char *text, size_t len);

/* Write a list back as text, one item a line; returns the bytes written. */
size_t imm_list_format(const struct imm_list *l, char *buf, size_t size);
size_t imm_ports_format(const unsigned short *ports, unsigned int nports,
			char *buf, size_t size);

/* Index of the exec dir that is a prefix of path, or -1. */
int imm_match_exec_dir(const struct imm_policy *p, const char *path,
		       size_t len);

/*
 * Index of the pattern found in the command line, or -1. A pattern that
 * starts with a letter or digit must start a word of the command line (at
 * its start or after a space, '/', '|', ';', '&', '(' or '`'), so that "nc "
 * does not match "rsync ".
 */
int imm_match_pattern(const struct imm_policy *p, const char *cmd,
		      size_t len);

/* Nonzero if port is in the blocked list (ports compare as numbers). */
int imm_port_blocked(const struct imm_policy *p, unsigned int port);

/*
 * Index of the sensitive file that path is, or -1. An entry that starts
 * with '/' matches the whole path; any other entry matches the end of the
 * path after a '/' (".ssh/id_rsa" matches "/home/a/.ssh/id_rsa").
 */
int imm_match_file(const struct imm_policy *p, const char *path, size_t len);

/*
 * Nonzero if a file of this base name could be sensitive: a cheap test on
 * the dentry's name before the full path is built.
 */
int imm_file_candidate(const struct imm_policy *p, const char *name,
		       size_t len);

/* Nonzero for a privileged port (1..1023) bound by a non-root euid. */
int imm_priv_port_by_user(unsigned int port, unsigned int euid);

/* Nonzero for a change of effective uid from non-root to root. */
int imm_to_root(unsigned int old_euid, unsigned int new_euid);

/* Bounded length of a NUL-terminated string (at most max). */
size_t imm_strnlen(const char *s, size_t max);

#endif /* IMMUNE_POLICY_H */
