// SPDX-License-Identifier: GPL-2.0
/*
 * IMMUNE's eBPF sensor: process, network, file and credential events.
 *
 * Each hook fills one record in a BPF ring buffer, read by the agent
 * (src/immune/agent/ebpf.py, whose struct layouts must match these).
 * Opens are filtered here, against the watched paths the agent writes
 * into two maps, so that the ordinary stream of opens never leaves the
 * kernel. CO-RE: the agent compiles this file against a vmlinux.h made
 * by bpftool from the running kernel's BTF.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

#define PATH_LEN 256
#define ARGS_LEN 1024
#define PREFIX_LEN 64
#define PREFIXES 8
#define AF_INET 2
#define AF_INET6 10
#define EPERM 1

enum kind {
	K_EXEC = 1,
	K_FORK,
	K_EXIT,
	K_CONNECT,
	K_BIND,
	K_OPEN,
	K_CRED,
};

enum cred_call {
	C_SETUID = 1,
	C_SETREUID,
	C_SETRESUID,
	C_SETGID,
	C_SETREGID,
	C_SETRESGID,
};

struct head {
	__u64 ts;
	__u32 kind;
	__u32 pid;
	__u32 tid;
	__u32 ppid;
	__u32 uid;
	__u32 euid;
	__u32 gid;
	__s32 aux;
	char comm[16];
};

struct exec_rec {
	struct head h;
	__u32 filename_len;
	__u32 args_len;
	__u32 args_full;
	__u32 pad;
	char filename[PATH_LEN];
	char args[ARGS_LEN];
};

struct fork_rec {
	struct head h;
	__u32 child;
	__u32 pad;
};

struct net_rec {
	struct head h;
	__u16 family;
	__u16 port;
	__s32 fd;
	__u8 addr[16];
};

struct open_rec {
	struct head h;
	__s32 flags;
	__u32 pad;
	char path[PATH_LEN];
};

struct cred_rec {
	struct head h;
	__u32 call;
	__u32 old_uid;
	__u32 old_euid;
	__u32 arg[3];
	__s32 ret;
	__u32 pad;
};

struct config {
	__u32 agent_tgid;
	__u32 watch_opens;
	/* Refuse a change of effective uid from non-root to root. */
	__u32 block_setuid_root;
	/* When not 0, refuse only for the children of this process (tests). */
	__u32 block_scope_ppid;
};

struct prefix {
	__u32 len;
	char s[PREFIX_LEN];
};

struct path_buf {
	char s[PATH_LEN];
};

struct pending_cred {
	__u32 call;
	__u32 old_uid;
	__u32 old_euid;
	__u32 arg[3];
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 8 * 1024 * 1024);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
} settings SEC(".maps");

/* Exact paths whose opens are reported (key: NUL-padded path). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__uint(key_size, PATH_LEN);
	__uint(value_size, sizeof(__u8));
} watched SEC(".maps");

/* Directory prefixes whose opens are reported ("/root/.ssh/"). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, PREFIXES);
	__type(key, __u32);
	__type(value, struct prefix);
} prefixes SEC(".maps");

/* Remote ports whose connects are refused (BPF LSM), in host order. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u16);
	__type(value, __u8);
} blocked_ports SEC(".maps");

/* Scratch space for a path, too big for the 512-byte stack. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct path_buf);
} scratch SEC(".maps");

/* A credential call between its entry and its exit, by thread id. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, struct pending_cred);
} pending SEC(".maps");

/* Records the ring buffer had no room for; the agent reports them. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} lost SEC(".maps");

char LICENSE[] SEC("license") = "GPL";

static __always_inline struct config *get_config(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&settings, &zero);
}

/* Events of the agent itself are not reported (it would see its own work). */
static __always_inline int is_agent(void)
{
	struct config *cfg = get_config();
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;

	return cfg && cfg->agent_tgid == tgid;
}

static __always_inline void count_lost(void)
{
	__u32 zero = 0;
	__u64 *n = bpf_map_lookup_elem(&lost, &zero);

	if (n)
		*n += 1;
}

static __always_inline void fill_head(struct head *h, __u32 kind)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	__u64 pid_tgid = bpf_get_current_pid_tgid();

	h->ts = bpf_ktime_get_ns();
	h->kind = kind;
	h->pid = pid_tgid >> 32;
	h->tid = (__u32)pid_tgid;
	h->ppid = BPF_CORE_READ(task, real_parent, tgid);
	h->uid = BPF_CORE_READ(task, cred, uid.val);
	h->euid = BPF_CORE_READ(task, cred, euid.val);
	h->gid = BPF_CORE_READ(task, cred, gid.val);
	h->aux = 0;
	bpf_get_current_comm(h->comm, sizeof(h->comm));
}

static __always_inline void *reserve(__u64 size)
{
	void *rec = bpf_ringbuf_reserve(&events, size, 0);

	if (!rec)
		count_lost();
	return rec;
}

/* --- Processes ---------------------------------------------------------- */

SEC("tp_btf/sched_process_exec")
int BPF_PROG(on_exec, struct task_struct *p, pid_t old_pid,
	     struct linux_binprm *bprm)
{
	struct exec_rec *rec;
	unsigned long start, end, len;
	const char *filename;
	long n;

	if (is_agent())
		return 0;
	rec = reserve(sizeof(*rec));
	if (!rec)
		return 0;
	fill_head(&rec->h, K_EXEC);
	filename = BPF_CORE_READ(bprm, filename);
	n = bpf_probe_read_kernel_str(rec->filename, sizeof(rec->filename),
				      filename);
	rec->filename_len = n > 0 ? n - 1 : 0;

	start = BPF_CORE_READ(p, mm, arg_start);
	end = BPF_CORE_READ(p, mm, arg_end);
	len = end > start ? end - start : 0;
	rec->args_full = len <= ARGS_LEN;
	if (len > ARGS_LEN)
		len = ARGS_LEN;
	rec->args_len = 0;
	if (len && !bpf_probe_read_user(rec->args, len,
					(void *)start))
		rec->args_len = len;
	bpf_ringbuf_submit(rec, 0);
	return 0;
}

SEC("tp_btf/sched_process_fork")
int BPF_PROG(on_fork, struct task_struct *parent, struct task_struct *child)
{
	struct fork_rec *rec;

	/* A new thread is not a new process; the agent's children are reported. */
	if (BPF_CORE_READ(child, pid) != BPF_CORE_READ(child, tgid))
		return 0;
	rec = reserve(sizeof(*rec));
	if (!rec)
		return 0;
	fill_head(&rec->h, K_FORK);
	rec->child = BPF_CORE_READ(child, tgid);
	bpf_ringbuf_submit(rec, 0);
	return 0;
}

SEC("tp_btf/sched_process_exit")
int BPF_PROG(on_exit, struct task_struct *p)
{
	struct fork_rec *rec;

	if (BPF_CORE_READ(p, pid) != BPF_CORE_READ(p, tgid))
		return 0;
	if (is_agent())
		return 0;
	rec = reserve(sizeof(*rec));
	if (!rec)
		return 0;
	fill_head(&rec->h, K_EXIT);
	rec->h.aux = BPF_CORE_READ(p, exit_code);
	rec->child = 0;
	bpf_ringbuf_submit(rec, 0);
	return 0;
}

/* --- Network ------------------------------------------------------------ */

struct pending_net {
	__u16 family;
	__u16 port;
	__s32 fd;
	__u8 addr[16];
};

/* A connect or bind between its entry and its exit, by thread id. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, struct pending_net);
} pending_net SEC(".maps");

/* Keep the address at entry; report it at exit with the call's result. */
static __always_inline int net_enter(struct trace_event_raw_sys_enter *ctx)
{
	const void *uaddr = (const void *)ctx->args[1];
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct pending_net pn = {};

	if (is_agent())
		return 0;
	if (bpf_probe_read_user(&pn.family, sizeof(pn.family), uaddr))
		return 0;
	if (pn.family == AF_INET) {
		struct sockaddr_in sin = {};

		bpf_probe_read_user(&sin, sizeof(sin), uaddr);
		pn.port = __builtin_bswap16(sin.sin_port);
		__builtin_memcpy(pn.addr, &sin.sin_addr, 4);
	} else if (pn.family == AF_INET6) {
		struct sockaddr_in6 sin6 = {};

		bpf_probe_read_user(&sin6, sizeof(sin6), uaddr);
		pn.port = __builtin_bswap16(sin6.sin6_port);
		__builtin_memcpy(pn.addr, &sin6.sin6_addr, 16);
	} else {
		return 0;
	}
	pn.fd = (__s32)ctx->args[0];
	bpf_map_update_elem(&pending_net, &tid, &pn, BPF_ANY);
	return 0;
}

static __always_inline int net_exit(struct trace_event_raw_sys_exit *ctx,
				    __u32 kind)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct pending_net *pn = bpf_map_lookup_elem(&pending_net, &tid);
	struct net_rec *rec;

	if (!pn)
		return 0;
	rec = reserve(sizeof(*rec));
	if (rec) {
		fill_head(&rec->h, kind);
		rec->h.aux = ctx->ret;
		rec->family = pn->family;
		rec->port = pn->port;
		rec->fd = pn->fd;
		__builtin_memcpy(rec->addr, pn->addr, 16);
		bpf_ringbuf_submit(rec, 0);
	}
	bpf_map_delete_elem(&pending_net, &tid);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_connect")
int on_connect(struct trace_event_raw_sys_enter *ctx)
{
	return net_enter(ctx);
}

SEC("tracepoint/syscalls/sys_exit_connect")
int on_connect_exit(struct trace_event_raw_sys_exit *ctx)
{
	return net_exit(ctx, K_CONNECT);
}

SEC("tracepoint/syscalls/sys_enter_bind")
int on_bind(struct trace_event_raw_sys_enter *ctx)
{
	return net_enter(ctx);
}

SEC("tracepoint/syscalls/sys_exit_bind")
int on_bind_exit(struct trace_event_raw_sys_exit *ctx)
{
	return net_exit(ctx, K_BIND);
}

/* --- Opens of watched paths --------------------------------------------- */

static __always_inline int has_prefix(const char *path, struct prefix *p)
{
	__u32 i;

	if (p->len == 0 || p->len > PREFIX_LEN)
		return 0;
	for (i = 0; i < PREFIX_LEN; i++) {
		if (i >= p->len)
			return 1;
		if (path[i] != p->s[i])
			return 0;
	}
	return 1;
}

static __always_inline int is_watched(const char *path)
{
	__u32 i;

	if (bpf_map_lookup_elem(&watched, path))
		return 1;
	for (i = 0; i < PREFIXES; i++) {
		struct prefix *p = bpf_map_lookup_elem(&prefixes, &i);

		if (p && has_prefix(path, p))
			return 1;
	}
	return 0;
}

static __always_inline int on_open(const char *upath, __s32 flags)
{
	struct config *cfg = get_config();
	struct open_rec *rec;
	__u32 zero = 0;
	struct path_buf *buf;
	__u64 *word;
	char *path;
	int i;

	if (!cfg || !cfg->watch_opens || is_agent())
		return 0;
	buf = bpf_map_lookup_elem(&scratch, &zero);
	if (!buf)
		return 0;
	path = buf->s;
	/* The hash key is the whole buffer: clear what a longer path left. */
	for (i = 0; i < PATH_LEN / 8; i++) {
		word = (__u64 *)path + i;
		*word = 0;
	}
	if (bpf_probe_read_user_str(path, PATH_LEN, upath) <= 0)
		return 0;
	if (!is_watched(path))
		return 0;
	rec = reserve(sizeof(*rec));
	if (!rec)
		return 0;
	fill_head(&rec->h, K_OPEN);
	rec->flags = flags;
	__builtin_memcpy(rec->path, path, PATH_LEN);
	bpf_ringbuf_submit(rec, 0);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_openat")
int on_openat(struct trace_event_raw_sys_enter *ctx)
{
	return on_open((const char *)ctx->args[1], (__s32)ctx->args[2]);
}

SEC("tracepoint/syscalls/sys_enter_open")
int on_open_legacy(struct trace_event_raw_sys_enter *ctx)
{
	return on_open((const char *)ctx->args[0], (__s32)ctx->args[1]);
}

/* --- Credentials ---------------------------------------------------------- */

/*
 * Reading past a tracepoint's own arguments makes the attach fail with
 * EACCES, so each call reads only the nargs it has (a constant here).
 */
static __always_inline int cred_enter(struct trace_event_raw_sys_enter *ctx,
				      __u32 call, int nargs)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct pending_cred pc = {};

	if (is_agent())
		return 0;
	pc.call = call;
	pc.old_uid = BPF_CORE_READ(task, cred, uid.val);
	pc.old_euid = BPF_CORE_READ(task, cred, euid.val);
	pc.arg[0] = ctx->args[0];
	if (nargs > 1)
		pc.arg[1] = ctx->args[1];
	if (nargs > 2)
		pc.arg[2] = ctx->args[2];
	bpf_map_update_elem(&pending, &tid, &pc, BPF_ANY);
	return 0;
}

/* Whether the current process is one the blocking rules apply to. */
static __always_inline int in_block_scope(struct config *cfg)
{
	struct task_struct *task;

	if (!cfg->block_scope_ppid)
		return 1;
	task = (struct task_struct *)bpf_get_current_task();
	return BPF_CORE_READ(task, real_parent, tgid) == cfg->block_scope_ppid;
}

static __always_inline int refuse_root(struct pending_cred *pc, __u32 euid)
{
	struct config *cfg = get_config();

	if (!cfg || !cfg->block_setuid_root)
		return 0;
	if (pc->old_euid == 0 || euid != 0)
		return 0;
	return in_block_scope(cfg);
}

static __always_inline int cred_exit(struct trace_event_raw_sys_exit *ctx)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct pending_cred *pc = bpf_map_lookup_elem(&pending, &tid);
	struct cred_rec *rec;

	if (!pc)
		return 0;
	rec = reserve(sizeof(*rec));
	if (rec) {
		fill_head(&rec->h, K_CRED);
		if (refuse_root(pc, rec->h.euid)) {
			/* No LSM hook to refuse it: kill before it returns. */
			bpf_send_signal(9);
			rec->h.aux = -EPERM;
		}
		rec->call = pc->call;
		rec->old_uid = pc->old_uid;
		rec->old_euid = pc->old_euid;
		rec->arg[0] = pc->arg[0];
		rec->arg[1] = pc->arg[1];
		rec->arg[2] = pc->arg[2];
		rec->ret = ctx->ret;
		bpf_ringbuf_submit(rec, 0);
	}
	bpf_map_delete_elem(&pending, &tid);
	return 0;
}

#define CRED_HOOKS(name, call, nargs)					\
SEC("tracepoint/syscalls/sys_enter_" #name)				\
int enter_##name(struct trace_event_raw_sys_enter *ctx)			\
{									\
	return cred_enter(ctx, call, nargs);				\
}									\
SEC("tracepoint/syscalls/sys_exit_" #name)				\
int exit_##name(struct trace_event_raw_sys_exit *ctx)			\
{									\
	return cred_exit(ctx);						\
}

CRED_HOOKS(setuid, C_SETUID, 1)
CRED_HOOKS(setreuid, C_SETREUID, 2)
CRED_HOOKS(setresuid, C_SETRESUID, 3)
CRED_HOOKS(setgid, C_SETGID, 1)
CRED_HOOKS(setregid, C_SETREGID, 2)
CRED_HOOKS(setresgid, C_SETRESGID, 3)

/* --- Refusals ----------------------------------------------------------- */

/*
 * Connects to a blocked port: cgroup programs, attached by the agent to a
 * cgroup (the root of the cgroup v2 hierarchy, or the tests' own), refuse
 * them with EPERM. 0 refuses, 1 allows.
 */
static __always_inline int refuse_sockaddr(struct bpf_sock_addr *ctx)
{
	__u16 port = __builtin_bswap16((__u16)ctx->user_port);
	struct config *cfg = get_config();

	if (!cfg || cfg->agent_tgid == bpf_get_current_pid_tgid() >> 32)
		return 1;
	/* The connect's exit tracepoint reports it, with EPERM. */
	return bpf_map_lookup_elem(&blocked_ports, &port) ? 0 : 1;
}

SEC("cgroup/connect4")
int refuse_connect4(struct bpf_sock_addr *ctx)
{
	return refuse_sockaddr(ctx);
}

SEC("cgroup/connect6")
int refuse_connect6(struct bpf_sock_addr *ctx)
{
	return refuse_sockaddr(ctx);
}
