/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * IMMUNE kernel module: the records read from /dev/immune.
 *
 * Every read(2) returns whole records of IMMUNE_RECORD_SIZE bytes, in the
 * machine's byte order, laid out as below (README.md has the table).
 */
#ifndef IMMUNE_UAPI_H
#define IMMUNE_UAPI_H

#if defined(__linux__)
#include <linux/types.h>
#else
#include <sys/types.h>
typedef uint64_t __u64;
typedef uint32_t __u32;
typedef uint16_t __u16;
typedef uint8_t __u8;
#endif

#define IMMUNE_RECORD_VERSION	1
#define IMMUNE_RECORD_SIZE	512
#define IMMUNE_PATH_LEN		256
#define IMMUNE_CMDLINE_LEN	176

#define IMMUNE_OUTCOME_ALLOWED	0
#define IMMUNE_OUTCOME_BLOCKED	1

struct immune_record {
	__u64 ts_ns;		/* CLOCK_REALTIME, ns since the epoch */
	__u64 seq;		/* 1, 2, ... in the order produced */
	__u16 kind;		/* enum imm_kind */
	__u8 severity;		/* enum imm_severity */
	__u8 outcome;		/* IMMUNE_OUTCOME_* */
	__u32 pid;		/* thread group id of the task */
	__u32 ppid;		/* its parent's */
	__u32 uid;		/* real uid (before, for setuid) */
	__u32 euid;		/* effective uid (before, for setuid) */
	__u32 value;		/* fork: child pid; setuid: new euid;
				 * open: open flags; else 0
				 */
	__u16 port;		/* connect, bind: port, host order */
	__u16 family;		/* connect, bind: AF_INET or AF_INET6 */
	__u16 reason;		/* IMM_R_* bits; 0 if not a threat */
	__u8 version;		/* IMMUNE_RECORD_VERSION */
	__u8 pad;
	__u8 addr[16];		/* IPv4 in the first 4 bytes, or IPv6 */
	char comm[16];		/* NUL-terminated */
	char path[IMMUNE_PATH_LEN];	  /* exec, open: the file */
	char cmdline[IMMUNE_CMDLINE_LEN]; /* exec: argv joined by spaces */
};

#endif /* IMMUNE_UAPI_H */
