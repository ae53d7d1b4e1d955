// SPDX-License-Identifier: BSD-2-Clause
/*
 * IMMUNE for DragonFlyBSD: the same six hooks as the Linux module, by
 * replacing entries of the system call table (as the original module did),
 * with the same policy core (../immune_policy.c), the same records
 * (../immune_uapi.h) and the same tunables, as sysctls under
 * security.immune.
 *
 * NOT BUILT OR TESTED: IMMUNE's CI has no DragonFlyBSD machine; see
 * README.md in this directory. The hook wrappers run in system call
 * context, where copyin() may sleep; the ring is guarded by a spinlock.
 */
#include <sys/param.h>
#include <sys/systm.h>
#include <sys/kernel.h>
#include <sys/module.h>
#include <sys/sysent.h>
#include <sys/sysproto.h>
#include <sys/syscall.h>
#include <sys/sysctl.h>
#include <sys/malloc.h>
#include <sys/proc.h>
#include <sys/ucred.h>
#include <sys/socket.h>
#include <sys/spinlock.h>
#include <sys/spinlock2.h>
#include <netinet/in.h>

#include "../immune_policy.h"
#include "../immune_uapi.h"

#define IMM_RING_RECORDS	1024

MALLOC_DEFINE(M_IMMUNE, "immune", "IMMUNE ring and scratch space");

static struct imm_policy policy;
static struct spinlock imm_lock = SPINLOCK_INITIALIZER(imm_lock, "immune");
static struct immune_record *ring;
static unsigned int ring_head, ring_count;
static uint64_t ring_seq, n_events, n_threats, n_blocks, n_drops;

static void imm_emit(struct immune_record *rec)
{
	unsigned int tail;

	spin_lock(&imm_lock);
	rec->seq = ++ring_seq;
	n_events++;
	if (rec->reason)
		n_threats++;
	if (rec->outcome == IMMUNE_OUTCOME_BLOCKED)
		n_blocks++;
	if (ring_count < IMM_RING_RECORDS) {
		tail = (ring_head + ring_count) % IMM_RING_RECORDS;
		ring[tail] = *rec;
		ring_count++;
	} else {
		n_drops++;
	}
	spin_unlock(&imm_lock);
	if (policy.log_level > 1 || (policy.log_level && rec->reason))
		kprintf("IMMUNE: [%s] kind %u pid %u\n",
			rec->outcome ? "BLOCKED" : "AUDIT", rec->kind, rec->pid);
}

static void imm_fill(struct immune_record *rec, uint16_t kind)
{
	struct proc *p = curproc;
	struct ucred *cr = curthread->td_ucred;

	bzero(rec, sizeof(*rec));
	rec->ts_ns = (uint64_t)time_second * 1000000000ULL;
	rec->kind = kind;
	rec->version = IMMUNE_RECORD_VERSION;
	rec->pid = p->p_pid;
	rec->ppid = p->p_pptr ? p->p_pptr->p_pid : 0;
	rec->uid = cr->cr_ruid;
	rec->euid = cr->cr_uid;
	strlcpy(rec->comm, p->p_comm, sizeof(rec->comm));
}

/* --- Hooks: each wraps the system call it replaces in sysent[] ---------- */

static sy_call_t *orig_execve, *orig_fork, *orig_connect, *orig_bind;
static sy_call_t *orig_open, *orig_setuid;

static void imm_cmdline(struct immune_record *rec, char **argv)
{
	size_t len = 0, done;
	char *arg;
	int i;

	for (i = 0; i < 32 && len + 1 < sizeof(rec->cmdline); i++) {
		if (copyin(&argv[i], &arg, sizeof(arg)) || !arg)
			break;
		if (i)
			rec->cmdline[len++] = ' ';
		if (copyinstr(arg, rec->cmdline + len,
			      sizeof(rec->cmdline) - len, &done) && !done)
			break;
		len += done ? done - 1 : 0;
	}
	rec->cmdline[len] = '\0';
}

static int imm_execve(struct sysmsg *msg, const void *args)
{
	const struct execve_args *uap = args;
	struct immune_record rec;
	int dir, pat, block;
	size_t done;

	if (!policy.enabled)
		return orig_execve(msg, args);
	imm_fill(&rec, IMM_KIND_EXEC);
	if (copyinstr(uap->fname, rec.path, sizeof(rec.path), &done))
		rec.path[sizeof(rec.path) - 1] = '\0';
	imm_cmdline(&rec, uap->argv);
	spin_lock(&imm_lock);
	dir = imm_match_exec_dir(&policy, rec.path, strlen(rec.path));
	pat = imm_match_pattern(&policy, rec.cmdline, strlen(rec.cmdline));
	block = policy.block_mode && (dir >= 0 || pat >= 0);
	spin_unlock(&imm_lock);
	rec.reason = (dir >= 0 ? IMM_R_EXEC_DIR : 0) |
		     (pat >= 0 ? IMM_R_PATTERN : 0);
	rec.severity = rec.reason ? IMM_SEV_HIGH : IMM_SEV_INFO;
	rec.outcome = block ? IMMUNE_OUTCOME_BLOCKED : IMMUNE_OUTCOME_ALLOWED;
	imm_emit(&rec);
	return block ? EPERM : orig_execve(msg, args);
}

static int imm_fork(struct sysmsg *msg, const void *args)
{
	struct immune_record rec;
	int error = orig_fork(msg, args);

	if (!error && policy.enabled && msg->sysmsg_fds[0] > 0) {
		imm_fill(&rec, IMM_KIND_FORK);
		rec.value = msg->sysmsg_fds[0];
		imm_emit(&rec);
	}
	return error;
}

/* Copy in a sockaddr; returns the port, or -1 if not AF_INET/AF_INET6. */
static int imm_sockaddr(struct immune_record *rec, const void *uaddr,
			int len)
{
	struct sockaddr_in6 sa;

	if (len < (int)sizeof(struct sockaddr_in))
		return -1;
	if (len > (int)sizeof(sa))
		len = sizeof(sa);
	bzero(&sa, sizeof(sa));
	if (copyin(uaddr, &sa, len))
		return -1;
	if (sa.sin6_family == AF_INET) {
		struct sockaddr_in *in = (struct sockaddr_in *)&sa;

		rec->family = 2;
		rec->port = ntohs(in->sin_port);
		bcopy(&in->sin_addr, rec->addr, sizeof(in->sin_addr));
		return rec->port;
	}
	if (sa.sin6_family == AF_INET6 && len >= (int)sizeof(sa)) {
		rec->family = 10;
		rec->port = ntohs(sa.sin6_port);
		bcopy(&sa.sin6_addr, rec->addr, sizeof(sa.sin6_addr));
		return rec->port;
	}
	return -1;
}

static int imm_connect(struct sysmsg *msg, const void *args)
{
	const struct connect_args *uap = args;
	struct immune_record rec;
	int blocked, block;

	if (!policy.enabled || !policy.monitor_network)
		return orig_connect(msg, args);
	imm_fill(&rec, IMM_KIND_CONNECT);
	if (imm_sockaddr(&rec, uap->name, uap->namelen) < 0)
		return orig_connect(msg, args);
	spin_lock(&imm_lock);
	blocked = imm_port_blocked(&policy, rec.port);
	block = blocked && policy.block_mode;
	spin_unlock(&imm_lock);
	rec.reason = blocked ? IMM_R_PORT : 0;
	rec.severity = blocked ? IMM_SEV_HIGH : IMM_SEV_INFO;
	rec.outcome = block ? IMMUNE_OUTCOME_BLOCKED : IMMUNE_OUTCOME_ALLOWED;
	imm_emit(&rec);
	return block ? EPERM : orig_connect(msg, args);
}

static int imm_bind(struct sysmsg *msg, const void *args)
{
	const struct bind_args *uap = args;
	struct immune_record rec;

	if (policy.enabled && policy.monitor_network) {
		imm_fill(&rec, IMM_KIND_BIND);
		if (imm_sockaddr(&rec, uap->name, uap->namelen) >= 0) {
			spin_lock(&imm_lock);
			if (imm_port_blocked(&policy, rec.port))
				rec.reason |= IMM_R_PORT;
			spin_unlock(&imm_lock);
			if (imm_priv_port_by_user(rec.port, rec.euid))
				rec.reason |= IMM_R_PRIV_PORT;
			rec.severity = rec.reason ? IMM_SEV_HIGH : IMM_SEV_INFO;
			imm_emit(&rec);
		}
	}
	return orig_bind(msg, args);
}

static int imm_open(struct sysmsg *msg, const void *args)
{
	const struct open_args *uap = args;
	struct immune_record rec;
	size_t done;
	int match;

	if (policy.enabled && policy.monitor_files) {
		imm_fill(&rec, IMM_KIND_OPEN);
		if (!copyinstr(uap->path, rec.path, sizeof(rec.path), &done)) {
			spin_lock(&imm_lock);
			match = imm_match_file(&policy, rec.path, done - 1);
			spin_unlock(&imm_lock);
			if (match >= 0) {
				rec.value = uap->flags;
				rec.reason = IMM_R_FILE;
				rec.severity = IMM_SEV_MEDIUM;
				imm_emit(&rec);
			}
		}
	}
	return orig_open(msg, args);
}

static int imm_setuid(struct sysmsg *msg, const void *args)
{
	const struct setuid_args *uap = args;
	struct immune_record rec;
	int block = 0;

	if (policy.enabled && policy.monitor_credentials) {
		imm_fill(&rec, IMM_KIND_SETUID);
		rec.value = uap->uid;
		if (imm_to_root(rec.euid, uap->uid)) {
			rec.reason = IMM_R_TO_ROOT;
			rec.severity = IMM_SEV_CRITICAL;
			block = policy.block_mode;
		}
		rec.outcome = block ? IMMUNE_OUTCOME_BLOCKED :
				      IMMUNE_OUTCOME_ALLOWED;
		if (rec.euid != rec.value)
			imm_emit(&rec);
	}
	return block ? EPERM : orig_setuid(msg, args);
}

/* --- sysctl security.immune.* --------------------------------------------- */

SYSCTL_NODE(_security, OID_AUTO, immune, CTLFLAG_RW, 0, "IMMUNE EDR");
SYSCTL_INT(_security_immune, OID_AUTO, enabled, CTLFLAG_RW,
	   &policy.enabled, 0, "Hooks report and block");
SYSCTL_INT(_security_immune, OID_AUTO, block_mode, CTLFLAG_RW,
	   &policy.block_mode, 0, "Refuse what the policy flags");
SYSCTL_INT(_security_immune, OID_AUTO, monitor_network, CTLFLAG_RW,
	   &policy.monitor_network, 0, "connect and bind hooks");
SYSCTL_INT(_security_immune, OID_AUTO, monitor_files, CTLFLAG_RW,
	   &policy.monitor_files, 0, "open hook");
SYSCTL_INT(_security_immune, OID_AUTO, monitor_credentials, CTLFLAG_RW,
	   &policy.monitor_credentials, 0, "setuid hook");
SYSCTL_INT(_security_immune, OID_AUTO, log_level, CTLFLAG_RW,
	   &policy.log_level, 0, "0 quiet, 1 threats, 2 all");
SYSCTL_QUAD(_security_immune, OID_AUTO, events, CTLFLAG_RD, &n_events, 0, "");
SYSCTL_QUAD(_security_immune, OID_AUTO, threats, CTLFLAG_RD, &n_threats, 0,
	    "");
SYSCTL_QUAD(_security_immune, OID_AUTO, blocks, CTLFLAG_RD, &n_blocks, 0, "");
SYSCTL_QUAD(_security_immune, OID_AUTO, drops, CTLFLAG_RD, &n_drops, 0, "");

/* A list as text (one item a line); a write replaces it whole. */
static int imm_sysctl_list(SYSCTL_HANDLER_ARGS)
{
	struct imm_list *list = arg1, *copy;
	char *buf;
	int error, n;

	buf = kmalloc(4096, M_IMMUNE, M_WAITOK | M_ZERO);
	copy = kmalloc(sizeof(*copy), M_IMMUNE, M_WAITOK);
	spin_lock(&imm_lock);
	*copy = *list;
	spin_unlock(&imm_lock);
	imm_list_format(copy, buf, 4096);
	error = sysctl_handle_string(oidp, buf, 4096, req);
	if (!error && req->newptr) {
		n = imm_list_parse(copy, buf, strlen(buf));
		if (n < 0) {
			error = -n;
		} else {
			spin_lock(&imm_lock);
			*list = *copy;
			spin_unlock(&imm_lock);
		}
	}
	kfree(copy, M_IMMUNE);
	kfree(buf, M_IMMUNE);
	return error;
}

SYSCTL_PROC(_security_immune, OID_AUTO, exec_dirs,
	    CTLTYPE_STRING | CTLFLAG_RW, &policy.exec_dirs, 0,
	    imm_sysctl_list, "A", "Executables refused under these");
SYSCTL_PROC(_security_immune, OID_AUTO, patterns,
	    CTLTYPE_STRING | CTLFLAG_RW, &policy.patterns, 0,
	    imm_sysctl_list, "A", "Command lines refused with these");
SYSCTL_PROC(_security_immune, OID_AUTO, files,
	    CTLTYPE_STRING | CTLFLAG_RW, &policy.files, 0,
	    imm_sysctl_list, "A", "Files whose opening is audited");

static int imm_sysctl_ports(SYSCTL_HANDLER_ARGS)
{
	unsigned short ports[IMM_MAX_PORTS];
	unsigned int n;
	char buf[256];
	int error, r;

	spin_lock(&imm_lock);
	imm_ports_format(policy.ports, policy.nports, buf, sizeof(buf));
	spin_unlock(&imm_lock);
	error = sysctl_handle_string(oidp, buf, sizeof(buf), req);
	if (error || !req->newptr)
		return error;
	r = imm_ports_parse(ports, &n, buf, strlen(buf));
	if (r < 0)
		return -r;
	spin_lock(&imm_lock);
	bcopy(ports, policy.ports, sizeof(ports));
	policy.nports = n;
	spin_unlock(&imm_lock);
	return 0;
}

SYSCTL_PROC(_security_immune, OID_AUTO, ports, CTLTYPE_STRING | CTLFLAG_RW,
	    NULL, 0, imm_sysctl_ports, "A", "Ports refused to connect to");

/* Reading security.immune.records takes the queued records off the ring. */
static int imm_sysctl_records(SYSCTL_HANDLER_ARGS)
{
	struct immune_record *out;
	unsigned int max, n = 0;
	int error;

	max = req->oldptr ? req->oldlen / sizeof(*out) : 0;
	if (max > 64)
		max = 64;
	if (!max)
		return SYSCTL_OUT(req, NULL, 64 * sizeof(*out));
	out = kmalloc(max * sizeof(*out), M_IMMUNE, M_WAITOK);
	spin_lock(&imm_lock);
	while (n < max && ring_count) {
		out[n++] = ring[ring_head];
		ring_head = (ring_head + 1) % IMM_RING_RECORDS;
		ring_count--;
	}
	spin_unlock(&imm_lock);
	error = SYSCTL_OUT(req, out, n * sizeof(*out));
	kfree(out, M_IMMUNE);
	return error;
}

SYSCTL_PROC(_security_immune, OID_AUTO, records, CTLTYPE_OPAQUE | CTLFLAG_RD,
	    NULL, 0, imm_sysctl_records, "S,immune_record",
	    "Queued records, taken off the ring");

/* --- Load and unload -------------------------------------------------------- */

static void imm_swap(int nr, sy_call_t **saved, sy_call_t *hook)
{
	*saved = sysent[nr].sy_call;
	sysent[nr].sy_call = hook;
}

static int imm_modevent(module_t mod, int type, void *data)
{
	switch (type) {
	case MOD_LOAD:
		imm_policy_defaults(&policy);
		ring = kmalloc(IMM_RING_RECORDS * sizeof(*ring), M_IMMUNE,
			       M_WAITOK | M_ZERO);
		imm_swap(SYS_execve, &orig_execve, imm_execve);
		imm_swap(SYS_fork, &orig_fork, imm_fork);
		imm_swap(SYS_connect, &orig_connect, imm_connect);
		imm_swap(SYS_bind, &orig_bind, imm_bind);
		imm_swap(SYS_open, &orig_open, imm_open);
		imm_swap(SYS_setuid, &orig_setuid, imm_setuid);
		kprintf("IMMUNE: loaded, 6 hooks\n");
		return 0;
	case MOD_UNLOAD:
		sysent[SYS_execve].sy_call = orig_execve;
		sysent[SYS_fork].sy_call = orig_fork;
		sysent[SYS_connect].sy_call = orig_connect;
		sysent[SYS_bind].sy_call = orig_bind;
		sysent[SYS_open].sy_call = orig_open;
		sysent[SYS_setuid].sy_call = orig_setuid;
		kfree(ring, M_IMMUNE);
		return 0;
	default:
		return EOPNOTSUPP;
	}
}

static moduledata_t imm_mod = { "immune", imm_modevent, NULL };

DECLARE_MODULE(immune, imm_mod, SI_SUB_DRIVERS, SI_ORDER_MIDDLE);
MODULE_VERSION(immune, 1);
