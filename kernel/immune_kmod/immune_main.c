// SPDX-License-Identifier: GPL-2.0
/*
 * IMMUNE: six hooks (exec, fork, connect, bind, open, setuid) through
 * kprobes and kretprobes, a ring of fixed-size records read from
 * /dev/immune, and tunables under /sys/class/misc/immune/.
 *
 * Decisions come from the portable policy core (immune_policy.c). Handlers
 * run with preemption disabled: they take spinlocks with interrupts saved,
 * read user memory only with copy_from_user_nofault() and never sleep.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/kprobes.h>
#include <linux/miscdevice.h>
#include <linux/fs.h>
#include <linux/binfmts.h>
#include <linux/cred.h>
#include <linux/sched.h>
#include <linux/sched/task.h>
#include <linux/sched/task_stack.h>
#include <linux/uaccess.h>
#include <linux/slab.h>
#include <linux/vmalloc.h>
#include <linux/poll.h>
#include <linux/wait.h>
#include <linux/spinlock.h>
#include <linux/percpu.h>
#include <linux/dcache.h>
#include <linux/net.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <linux/socket.h>
#include <linux/ptrace.h>
#include <linux/timekeeping.h>
#include <linux/compat.h>
#include <linux/string.h>
#include <linux/device.h>
#include <asm/unistd.h>

#include "immune_policy.h"
#include "immune_uapi.h"

#define IMM_RING_RECORDS	1024
#define IMM_READ_BATCH		64
#define IMM_MAX_ARGS		32

static_assert(sizeof(struct immune_record) == IMMUNE_RECORD_SIZE);

/* --- The ring ----------------------------------------------------------- */

struct imm_ring {
	spinlock_t lock;	/* guards all of the ring and its counters */
	struct immune_record *slots;
	unsigned int head;	/* next slot to read */
	unsigned int count;	/* records held */
	u64 seq;
	u64 events;
	u64 threats;
	u64 blocks;
	u64 drops;
};

static struct imm_ring ring = {
	.lock = __SPIN_LOCK_UNLOCKED(ring.lock),
};

static DECLARE_WAIT_QUEUE_HEAD(ring_wait);

static struct imm_policy policy;
static DEFINE_SPINLOCK(policy_lock);

static const char *const kind_names[] = {
	[IMM_KIND_EXEC] = "exec", [IMM_KIND_FORK] = "fork",
	[IMM_KIND_CONNECT] = "connect", [IMM_KIND_BIND] = "bind",
	[IMM_KIND_OPEN] = "open", [IMM_KIND_SETUID] = "setuid",
};

static void imm_log(const struct immune_record *rec)
{
	int level = READ_ONCE(policy.log_level);
	const char *what = rec->outcome ? "blocked" : "audit";
	const char *text = rec->path[0] ? rec->path : rec->comm;

	if (level == 0 || (level == 1 && !rec->reason))
		return;
	if (rec->kind == IMM_KIND_CONNECT || rec->kind == IMM_KIND_BIND)
		pr_info_ratelimited("[%s] %s port %u (pid=%u uid=%u)\n", what,
				    kind_names[rec->kind], rec->port, rec->pid,
				    rec->uid);
	else if (rec->kind == IMM_KIND_SETUID)
		pr_info_ratelimited("[%s] setuid %u->%u (pid=%u)\n", what,
				    rec->euid, rec->value, rec->pid);
	else
		pr_info_ratelimited("[%s] %s %*pE (pid=%u)\n", what,
				    kind_names[rec->kind],
				    (int)strnlen(text, IMMUNE_PATH_LEN), text,
				    rec->pid);
}

/* Queue a record; a full ring drops it and counts the drop. */
static void imm_emit(struct immune_record *rec)
{
	unsigned long flags;
	bool queued = false;

	spin_lock_irqsave(&ring.lock, flags);
	/*
	 * Stamp the time with the sequence number, under the lock: stamped
	 * earlier, two CPUs could queue records in an order their times
	 * contradict.
	 */
	rec->ts_ns = ktime_get_real_ns();
	rec->seq = ++ring.seq;
	ring.events++;
	if (rec->reason)
		ring.threats++;
	if (rec->outcome == IMMUNE_OUTCOME_BLOCKED)
		ring.blocks++;
	if (ring.count < IMM_RING_RECORDS) {
		unsigned int tail = (ring.head + ring.count) % IMM_RING_RECORDS;

		ring.slots[tail] = *rec;
		ring.count++;
		queued = true;
	} else {
		ring.drops++;
	}
	spin_unlock_irqrestore(&ring.lock, flags);
	imm_log(rec);
	if (queued)
		wake_up_interruptible(&ring_wait);
}

/* Take up to max records off the ring into out; returns how many. */
static unsigned int imm_take(struct immune_record *out, unsigned int max)
{
	unsigned long flags;
	unsigned int n = 0;

	spin_lock_irqsave(&ring.lock, flags);
	while (n < max && ring.count) {
		out[n++] = ring.slots[ring.head];
		ring.head = (ring.head + 1) % IMM_RING_RECORDS;
		ring.count--;
	}
	spin_unlock_irqrestore(&ring.lock, flags);
	return n;
}

static bool imm_ring_ready(void)
{
	return READ_ONCE(ring.count) != 0;
}

/* --- Filling records ---------------------------------------------------- */

/* Per-CPU scratch space: handlers run with preemption disabled. */
struct imm_scratch {
	struct immune_record rec;
	char buf[IMMUNE_PATH_LEN];
};

static DEFINE_PER_CPU(struct imm_scratch, scratch);

static void imm_fill(struct immune_record *rec, u16 kind)
{
	const struct cred *cred = current_cred();

	memset(rec, 0, sizeof(*rec));
	rec->kind = kind;
	rec->version = IMMUNE_RECORD_VERSION;
	rec->pid = task_tgid_nr(current);
	rcu_read_lock();
	rec->ppid = task_tgid_nr(rcu_dereference(current->real_parent));
	rcu_read_unlock();
	rec->uid = from_kuid(&init_user_ns, cred->uid);
	rec->euid = from_kuid(&init_user_ns, cred->euid);
	get_task_comm(rec->comm, current);
}

static void imm_set_path(struct immune_record *rec, const struct path *path,
			 char *buf)
{
	char *p = d_path(path, buf, IMMUNE_PATH_LEN);

	if (!IS_ERR(p))
		strscpy(rec->path, p, sizeof(rec->path));
}

/* Copy a user string into dst (at most size - 1 bytes, page by page). */
static size_t imm_user_string(char *dst, size_t size,
			      const char __user *src)
{
	size_t done = 0;

	while (done + 1 < size) {
		unsigned long addr = (unsigned long)src + done;
		size_t chunk = PAGE_SIZE - (addr & (PAGE_SIZE - 1));
		size_t i;

		chunk = min(chunk, size - 1 - done);
		if (copy_from_user_nofault(dst + done, src + done, chunk))
			break;
		for (i = 0; i < chunk; i++) {
			if (!dst[done + i])
				return done + i;
		}
		done += chunk;
	}
	dst[done] = '\0';
	return done;
}

/*
 * The command line of the execve(2) or execveat(2) being checked, joined
 * by spaces, read from the caller's memory (still its own at this point).
 * Pages not resident cannot be read without sleeping: what was read stays.
 */
static size_t imm_exec_cmdline(char *out, size_t size)
{
	struct pt_regs *uregs = task_pt_regs(current);
	const char __user *const __user *argv;
	size_t len = 0;
	int i;

	out[0] = '\0';
	if (!uregs || in_compat_syscall())
		return 0;
	if (uregs->orig_ax == __NR_execve)
		argv = (const char __user *const __user *)uregs->si;
	else if (uregs->orig_ax == __NR_execveat)
		argv = (const char __user *const __user *)uregs->dx;
	else
		return 0;
	for (i = 0; i < IMM_MAX_ARGS && len + 1 < size; i++) {
		const char __user *arg;

		if (copy_from_user_nofault(&arg, argv + i, sizeof(arg)) || !arg)
			break;
		if (i)
			out[len++] = ' ';
		len += imm_user_string(out + len, size - len, arg);
	}
	out[len] = '\0';
	return len;
}

/* --- Hooks --------------------------------------------------------------- */

struct imm_probe_data {
	int block;
	unsigned long arg;
};

static int imm_block_ret(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	struct imm_probe_data *d = (struct imm_probe_data *)ri->data;

	if (d->block)
		regs_set_return_value(regs, (unsigned long)-EPERM);
	return 0;
}

/* exec: security_bprm_check(struct linux_binprm *bprm) */
static int imm_exec_entry(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	struct imm_probe_data *d = (struct imm_probe_data *)ri->data;
	struct linux_binprm *bprm = (struct linux_binprm *)regs->di;
	struct imm_scratch *s;
	struct immune_record *rec;
	unsigned long flags;
	int dir, pat;

	d->block = 0;
	if (!READ_ONCE(policy.enabled) || !bprm || !bprm->file)
		return 1;
	s = get_cpu_ptr(&scratch);
	rec = &s->rec;
	imm_fill(rec, IMM_KIND_EXEC);
	imm_set_path(rec, &bprm->file->f_path, s->buf);
	if (!rec->path[0] && bprm->filename)
		strscpy(rec->path, bprm->filename, sizeof(rec->path));
	imm_exec_cmdline(rec->cmdline, sizeof(rec->cmdline));
	spin_lock_irqsave(&policy_lock, flags);
	dir = imm_match_exec_dir(&policy, rec->path,
				 strnlen(rec->path, sizeof(rec->path)));
	pat = imm_match_pattern(&policy, rec->cmdline,
				strnlen(rec->cmdline, sizeof(rec->cmdline)));
	d->block = policy.block_mode && (dir >= 0 || pat >= 0);
	spin_unlock_irqrestore(&policy_lock, flags);
	if (dir >= 0)
		rec->reason |= IMM_R_EXEC_DIR;
	if (pat >= 0)
		rec->reason |= IMM_R_PATTERN;
	rec->severity = rec->reason ? IMM_SEV_HIGH : IMM_SEV_INFO;
	rec->outcome = d->block ? IMMUNE_OUTCOME_BLOCKED : IMMUNE_OUTCOME_ALLOWED;
	imm_emit(rec);
	put_cpu_ptr(&scratch);
	return d->block ? 0 : 1;
}

/* fork: kernel_clone(struct kernel_clone_args *args), child pid returned */
static int imm_fork_entry(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	struct kernel_clone_args *args = (struct kernel_clone_args *)regs->di;

	if (!READ_ONCE(policy.enabled) || !args || (args->flags & CLONE_THREAD))
		return 1;
	return 0;
}

static int imm_fork_ret(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	long child = (long)regs_return_value(regs);
	struct immune_record *rec;

	if (child <= 0)
		return 0;
	rec = &get_cpu_ptr(&scratch)->rec;
	imm_fill(rec, IMM_KIND_FORK);
	rec->value = (u32)child;
	imm_emit(rec);
	put_cpu_ptr(&scratch);
	return 0;
}

/* The port and address of an AF_INET or AF_INET6 sockaddr; false if not. */
static bool imm_sockaddr(struct immune_record *rec, const struct sockaddr *sa,
			 int len)
{
	if (!sa || len < (int)sizeof(sa->sa_family))
		return false;
	if (sa->sa_family == AF_INET && len >= (int)sizeof(struct sockaddr_in)) {
		const struct sockaddr_in *in = (const struct sockaddr_in *)sa;

		rec->family = AF_INET;
		rec->port = ntohs(in->sin_port);
		memcpy(rec->addr, &in->sin_addr, sizeof(in->sin_addr));
		return true;
	}
	if (sa->sa_family == AF_INET6 &&
	    len >= (int)sizeof(struct sockaddr_in6)) {
		const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;

		rec->family = AF_INET6;
		rec->port = ntohs(in6->sin6_port);
		memcpy(rec->addr, &in6->sin6_addr, sizeof(in6->sin6_addr));
		return true;
	}
	return false;
}

/* connect: security_socket_connect(sock, address, addrlen) */
static int imm_connect_entry(struct kretprobe_instance *ri,
			     struct pt_regs *regs)
{
	struct imm_probe_data *d = (struct imm_probe_data *)ri->data;
	struct immune_record *rec;
	unsigned long flags;
	int blocked;

	d->block = 0;
	if (!READ_ONCE(policy.enabled) || !READ_ONCE(policy.monitor_network))
		return 1;
	rec = &get_cpu_ptr(&scratch)->rec;
	imm_fill(rec, IMM_KIND_CONNECT);
	if (!imm_sockaddr(rec, (const struct sockaddr *)regs->si,
			  (int)regs->dx)) {
		put_cpu_ptr(&scratch);
		return 1;
	}
	spin_lock_irqsave(&policy_lock, flags);
	blocked = imm_port_blocked(&policy, rec->port);
	d->block = blocked && policy.block_mode;
	spin_unlock_irqrestore(&policy_lock, flags);
	if (blocked) {
		rec->reason = IMM_R_PORT;
		rec->severity = IMM_SEV_HIGH;
	}
	rec->outcome = d->block ? IMMUNE_OUTCOME_BLOCKED : IMMUNE_OUTCOME_ALLOWED;
	imm_emit(rec);
	put_cpu_ptr(&scratch);
	return d->block ? 0 : 1;
}

/* bind: security_socket_bind(sock, address, addrlen); reported only */
static int imm_bind_pre(struct kprobe *kp, struct pt_regs *regs)
{
	struct immune_record *rec;
	unsigned long flags;
	int blocked;

	if (!READ_ONCE(policy.enabled) || !READ_ONCE(policy.monitor_network))
		return 0;
	rec = &get_cpu_ptr(&scratch)->rec;
	imm_fill(rec, IMM_KIND_BIND);
	if (!imm_sockaddr(rec, (const struct sockaddr *)regs->si,
			  (int)regs->dx)) {
		put_cpu_ptr(&scratch);
		return 0;
	}
	spin_lock_irqsave(&policy_lock, flags);
	blocked = imm_port_blocked(&policy, rec->port);
	spin_unlock_irqrestore(&policy_lock, flags);
	if (blocked)
		rec->reason |= IMM_R_PORT;
	if (imm_priv_port_by_user(rec->port, rec->euid))
		rec->reason |= IMM_R_PRIV_PORT;
	rec->severity = rec->reason ? IMM_SEV_HIGH : IMM_SEV_INFO;
	imm_emit(rec);
	put_cpu_ptr(&scratch);
	return 0;
}

/* open: do_filp_open(dfd, pathname, op), the opened file returned */
static int imm_open_entry(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	if (!READ_ONCE(policy.enabled) || !READ_ONCE(policy.monitor_files))
		return 1;
	return 0;
}

static int imm_open_ret(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	struct file *file = (struct file *)regs_return_value(regs);
	struct name_snapshot name;
	struct imm_scratch *s;
	struct immune_record *rec;
	unsigned long flags;
	int candidate, match;

	if (IS_ERR_OR_NULL(file))
		return 0;
	take_dentry_name_snapshot(&name, file->f_path.dentry);
	spin_lock_irqsave(&policy_lock, flags);
	candidate = imm_file_candidate(&policy, name.name.name, name.name.len);
	spin_unlock_irqrestore(&policy_lock, flags);
	release_dentry_name_snapshot(&name);
	if (!candidate)
		return 0;
	s = get_cpu_ptr(&scratch);
	rec = &s->rec;
	imm_fill(rec, IMM_KIND_OPEN);
	imm_set_path(rec, &file->f_path, s->buf);
	spin_lock_irqsave(&policy_lock, flags);
	match = imm_match_file(&policy, rec->path,
			       strnlen(rec->path, sizeof(rec->path)));
	spin_unlock_irqrestore(&policy_lock, flags);
	if (match >= 0) {
		rec->value = file->f_flags;
		rec->reason = IMM_R_FILE;
		rec->severity = IMM_SEV_MEDIUM;
		imm_emit(rec);
	}
	put_cpu_ptr(&scratch);
	return 0;
}

/*
 * setuid: security_task_fix_setuid(new, old, flags), called by setuid(2),
 * setreuid(2) and setresuid(2) once the kernel allowed the change and
 * before it is committed, so that an -EPERM here refuses it.
 */
static int imm_setuid_entry(struct kretprobe_instance *ri,
			    struct pt_regs *regs)
{
	struct imm_probe_data *d = (struct imm_probe_data *)ri->data;
	const struct cred *new = (const struct cred *)regs->di;
	const struct cred *old = (const struct cred *)regs->si;
	struct immune_record *rec;
	u32 old_euid, new_euid;

	d->block = 0;
	if (!READ_ONCE(policy.enabled) ||
	    !READ_ONCE(policy.monitor_credentials) || !new || !old)
		return 1;
	old_euid = from_kuid(&init_user_ns, old->euid);
	new_euid = from_kuid(&init_user_ns, new->euid);
	if (old_euid == new_euid && uid_eq(old->uid, new->uid))
		return 1;
	rec = &get_cpu_ptr(&scratch)->rec;
	imm_fill(rec, IMM_KIND_SETUID);
	rec->uid = from_kuid(&init_user_ns, old->uid);
	rec->euid = old_euid;
	rec->value = new_euid;
	if (imm_to_root(old_euid, new_euid)) {
		rec->reason = IMM_R_TO_ROOT;
		rec->severity = IMM_SEV_CRITICAL;
		d->block = READ_ONCE(policy.block_mode);
	}
	rec->outcome = d->block ? IMMUNE_OUTCOME_BLOCKED : IMMUNE_OUTCOME_ALLOWED;
	imm_emit(rec);
	put_cpu_ptr(&scratch);
	return d->block ? 0 : 1;
}

static struct kretprobe imm_kretprobes[] = {
	{
		.kp.symbol_name = "security_bprm_check",
		.entry_handler = imm_exec_entry,
		.handler = imm_block_ret,
		.data_size = sizeof(struct imm_probe_data),
		.maxactive = 64,
	},
	{
		.kp.symbol_name = "kernel_clone",
		.entry_handler = imm_fork_entry,
		.handler = imm_fork_ret,
		.data_size = sizeof(struct imm_probe_data),
		.maxactive = 64,
	},
	{
		.kp.symbol_name = "security_socket_connect",
		.entry_handler = imm_connect_entry,
		.handler = imm_block_ret,
		.data_size = sizeof(struct imm_probe_data),
		.maxactive = 64,
	},
	{
		.kp.symbol_name = "do_filp_open",
		.entry_handler = imm_open_entry,
		.handler = imm_open_ret,
		.data_size = sizeof(struct imm_probe_data),
		.maxactive = 128,
	},
	{
		.kp.symbol_name = "security_task_fix_setuid",
		.entry_handler = imm_setuid_entry,
		.handler = imm_block_ret,
		.data_size = sizeof(struct imm_probe_data),
		.maxactive = 32,
	},
};

static struct kprobe imm_bind_probe = {
	.symbol_name = "security_socket_bind",
	.pre_handler = imm_bind_pre,
};

static unsigned long imm_missed(void)
{
	unsigned long missed = imm_bind_probe.nmissed;
	int i;

	for (i = 0; i < ARRAY_SIZE(imm_kretprobes); i++)
		missed += imm_kretprobes[i].nmissed +
			  imm_kretprobes[i].kp.nmissed;
	return missed;
}

/* --- /dev/immune ---------------------------------------------------------- */

static ssize_t imm_read(struct file *file, char __user *buf, size_t count,
			loff_t *ppos)
{
	struct immune_record *out;
	unsigned int max, n;
	ssize_t ret;

	if (count < IMMUNE_RECORD_SIZE)
		return -EINVAL;
	max = min_t(size_t, count / IMMUNE_RECORD_SIZE, IMM_READ_BATCH);
	out = kmalloc_array(max, sizeof(*out), GFP_KERNEL);
	if (!out)
		return -ENOMEM;
	for (;;) {
		n = imm_take(out, max);
		if (n)
			break;
		if (file->f_flags & O_NONBLOCK) {
			ret = -EAGAIN;
			goto out;
		}
		ret = wait_event_interruptible(ring_wait, imm_ring_ready());
		if (ret)
			goto out;
	}
	ret = n * IMMUNE_RECORD_SIZE;
	if (copy_to_user(buf, out, ret)) {
		spin_lock_irq(&ring.lock);
		ring.drops += n;
		spin_unlock_irq(&ring.lock);
		ret = -EFAULT;
	}
out:
	kfree(out);
	return ret;
}

static __poll_t imm_poll(struct file *file, poll_table *wait)
{
	poll_wait(file, &ring_wait, wait);
	return imm_ring_ready() ? EPOLLIN | EPOLLRDNORM : 0;
}

static const struct file_operations imm_fops = {
	.owner = THIS_MODULE,
	.read = imm_read,
	.poll = imm_poll,
	.llseek = noop_llseek,
};

/* --- Tunables: /sys/class/misc/immune/ ------------------------------------ */

static ssize_t imm_show_int(char *buf, const int *field)
{
	return sysfs_emit(buf, "%d\n", READ_ONCE(*field));
}

static ssize_t imm_store_int(const char *buf, size_t len, int *field, int max)
{
	unsigned long flags;
	int value, err;

	err = kstrtoint(buf, 10, &value);
	if (err)
		return err;
	if (value < 0 || value > max)
		return -ERANGE;
	spin_lock_irqsave(&policy_lock, flags);
	*field = value;
	spin_unlock_irqrestore(&policy_lock, flags);
	return len;
}

#define IMM_INT_ATTR(name, max)						\
static ssize_t name##_show(struct device *dev,				\
			   struct device_attribute *attr, char *buf)	\
{									\
	return imm_show_int(buf, &policy.name);				\
}									\
static ssize_t name##_store(struct device *dev,				\
			    struct device_attribute *attr,		\
			    const char *buf, size_t len)		\
{									\
	return imm_store_int(buf, len, &policy.name, max);		\
}									\
static DEVICE_ATTR_ADMIN_RW(name)

IMM_INT_ATTR(enabled, 1);
IMM_INT_ATTR(block_mode, 1);
IMM_INT_ATTR(monitor_network, 1);
IMM_INT_ATTR(monitor_files, 1);
IMM_INT_ATTR(monitor_credentials, 1);
IMM_INT_ATTR(log_level, 2);

static ssize_t imm_show_list(char *buf, const struct imm_list *list)
{
	struct imm_list *copy = kmalloc(sizeof(*copy), GFP_KERNEL);
	unsigned long flags;
	size_t len;

	if (!copy)
		return -ENOMEM;
	spin_lock_irqsave(&policy_lock, flags);
	*copy = *list;
	spin_unlock_irqrestore(&policy_lock, flags);
	len = imm_list_format(copy, buf, PAGE_SIZE);
	kfree(copy);
	return len;
}

static ssize_t imm_store_list(const char *buf, size_t len,
			      struct imm_list *list)
{
	struct imm_list *parsed = kmalloc(sizeof(*parsed), GFP_KERNEL);
	unsigned long flags;
	int n;

	if (!parsed)
		return -ENOMEM;
	n = imm_list_parse(parsed, buf, len);
	if (n >= 0) {
		spin_lock_irqsave(&policy_lock, flags);
		*list = *parsed;
		spin_unlock_irqrestore(&policy_lock, flags);
	}
	kfree(parsed);
	return n < 0 ? n : len;
}

#define IMM_LIST_ATTR(name)						\
static ssize_t name##_show(struct device *dev,				\
			   struct device_attribute *attr, char *buf)	\
{									\
	return imm_show_list(buf, &policy.name);			\
}									\
static ssize_t name##_store(struct device *dev,				\
			    struct device_attribute *attr,		\
			    const char *buf, size_t len)		\
{									\
	return imm_store_list(buf, len, &policy.name);			\
}									\
static DEVICE_ATTR_ADMIN_RW(name)

IMM_LIST_ATTR(exec_dirs);
IMM_LIST_ATTR(patterns);
IMM_LIST_ATTR(files);

static ssize_t ports_show(struct device *dev, struct device_attribute *attr,
			  char *buf)
{
	unsigned short ports[IMM_MAX_PORTS];
	unsigned long flags;
	unsigned int n;

	spin_lock_irqsave(&policy_lock, flags);
	n = policy.nports;
	memcpy(ports, policy.ports, sizeof(ports));
	spin_unlock_irqrestore(&policy_lock, flags);
	return imm_ports_format(ports, n, buf, PAGE_SIZE);
}

static ssize_t ports_store(struct device *dev, struct device_attribute *attr,
			   const char *buf, size_t len)
{
	unsigned short ports[IMM_MAX_PORTS];
	unsigned long flags;
	unsigned int n;
	int ret;

	ret = imm_ports_parse(ports, &n, buf, len);
	if (ret < 0)
		return ret;
	spin_lock_irqsave(&policy_lock, flags);
	memcpy(policy.ports, ports, sizeof(ports));
	policy.nports = n;
	spin_unlock_irqrestore(&policy_lock, flags);
	return len;
}
static DEVICE_ATTR_ADMIN_RW(ports);

static ssize_t stats_show(struct device *dev, struct device_attribute *attr,
			  char *buf)
{
	u64 events, threats, blocks, drops;
	unsigned int queued;
	unsigned long flags;

	spin_lock_irqsave(&ring.lock, flags);
	events = ring.events;
	threats = ring.threats;
	blocks = ring.blocks;
	drops = ring.drops;
	queued = ring.count;
	spin_unlock_irqrestore(&ring.lock, flags);
	return sysfs_emit(buf,
			  "events %llu\nthreats %llu\nblocks %llu\ndrops %llu\nmissed %lu\nqueued %u\ncapacity %u\n",
			  events, threats, blocks, drops, imm_missed(), queued,
			  IMM_RING_RECORDS);
}
static DEVICE_ATTR_RO(stats);

static struct attribute *imm_attrs[] = {
	&dev_attr_enabled.attr,
	&dev_attr_block_mode.attr,
	&dev_attr_monitor_network.attr,
	&dev_attr_monitor_files.attr,
	&dev_attr_monitor_credentials.attr,
	&dev_attr_log_level.attr,
	&dev_attr_exec_dirs.attr,
	&dev_attr_patterns.attr,
	&dev_attr_files.attr,
	&dev_attr_ports.attr,
	&dev_attr_stats.attr,
	NULL,
};
ATTRIBUTE_GROUPS(imm);

static struct miscdevice imm_misc = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "immune",
	.fops = &imm_fops,
	.groups = imm_groups,
	.mode = 0400,
};

/* --- Load and unload ------------------------------------------------------ */

static struct kretprobe *imm_kretprobe_ptrs[ARRAY_SIZE(imm_kretprobes)];

static int __init imm_init(void)
{
	int i, err;

	imm_policy_defaults(&policy);
	ring.slots = vzalloc(array_size(IMM_RING_RECORDS, sizeof(*ring.slots)));
	if (!ring.slots)
		return -ENOMEM;
	err = misc_register(&imm_misc);
	if (err)
		goto err_free_ring;
	for (i = 0; i < ARRAY_SIZE(imm_kretprobes); i++) {
		imm_kretprobe_ptrs[i] = &imm_kretprobes[i];
		err = register_kretprobe(&imm_kretprobes[i]);
		if (err) {
			pr_err("cannot hook %s: %d\n",
			       imm_kretprobes[i].kp.symbol_name, err);
			goto err_unhook;
		}
	}
	err = register_kprobe(&imm_bind_probe);
	if (err) {
		pr_err("cannot hook %s: %d\n", imm_bind_probe.symbol_name, err);
		goto err_unhook;
	}
	pr_info("loaded: 6 hooks, ring of %u records of %u bytes\n",
		IMM_RING_RECORDS, IMMUNE_RECORD_SIZE);
	return 0;

err_unhook:
	if (i)
		unregister_kretprobes(imm_kretprobe_ptrs, i);
	misc_deregister(&imm_misc);
err_free_ring:
	vfree(ring.slots);
	return err;
}

static void __exit imm_exit(void)
{
	unregister_kprobe(&imm_bind_probe);
	unregister_kretprobes(imm_kretprobe_ptrs, ARRAY_SIZE(imm_kretprobes));
	misc_deregister(&imm_misc);
	pr_info("unloaded: %llu events, %llu threats, %llu blocks, %llu drops\n",
		ring.events, ring.threats, ring.blocks, ring.drops);
	vfree(ring.slots);
}

module_init(imm_init);
module_exit(imm_exit);

MODULE_LICENSE("GPL");
MODULE_AUTHOR("IMMUNE contributors");
MODULE_DESCRIPTION("IMMUNE EDR: exec, fork, connect, bind, open and setuid hooks");
