// SPDX-License-Identifier: GPL-2.0
/*
 * Fuzz target of the policy core. With clang -fsanitize=fuzzer,address it is
 * a libFuzzer target; built without IMM_LIBFUZZER it has its own driver that
 * feeds it hostile inputs from a fixed seed (long paths, no NUL, every byte
 * value), so that gcc's ASan checks it where clang is missing.
 *
 * The first byte picks the operation; the rest is the input, copied to a
 * heap block of exactly its size so that any read past it is caught.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../immune_policy.h"

static struct imm_policy policy;
static int ready;

static void check_formatted(const char *buf, size_t n, size_t size)
{
	if (size && (n >= size || buf[n] != '\0'))
		abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	unsigned short ports[IMM_MAX_PORTS];
	struct imm_list list;
	unsigned int nports;
	char out[4200];
	size_t len, cap, n;
	char *in;
	int r;

	if (!ready) {
		imm_policy_defaults(&policy);
		ready = 1;
	}
	if (!size)
		return 0;
	len = size - 1;
	in = malloc(len ? len : 1);
	if (!in)
		return 0;
	memcpy(in, data + 1, len);
	cap = data[0] % sizeof(out);
	switch (data[0] % 8) {
	case 0:
		r = imm_list_parse(&list, in, len);
		if (r >= 0) {
			if ((unsigned int)r != list.count || r > IMM_MAX_ITEMS)
				abort();
			policy.patterns = list;
			n = imm_list_format(&list, out, cap);
			check_formatted(out, n, cap);
		}
		break;
	case 1:
		r = imm_ports_parse(ports, &nports, in, len);
		if (r >= 0) {
			n = imm_ports_format(ports, nports, out, cap);
			check_formatted(out, n, cap);
		}
		break;
	case 2:
		r = imm_match_exec_dir(&policy, in, len);
		if (r >= (int)policy.exec_dirs.count)
			abort();
		break;
	case 3:
		r = imm_match_pattern(&policy, in, len);
		if (r >= (int)policy.patterns.count)
			abort();
		break;
	case 4:
		r = imm_match_file(&policy, in, len);
		if (r >= (int)policy.files.count)
			abort();
		break;
	case 5:
		imm_file_candidate(&policy, in, len);
		break;
	case 6:
		r = imm_list_parse(&list, in, len);
		if (r >= 0)
			policy.files = list;
		break;
	default:
		r = imm_list_parse(&list, in, len);
		if (r >= 0)
			policy.exec_dirs = list;
		imm_policy_defaults(&policy);
		break;
	}
	free(in);
	return 0;
}

#ifndef IMM_LIBFUZZER
static uint64_t rng = 0x9e3779b97f4a7c15ULL;

static uint64_t next(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return rng;
}

int main(int argc, char **argv)
{
	static uint8_t buf[70000];
	const char *alphabet = "/tmp/.ssh/id_rsa nc |sh\n,0123456789";
	long runs = argc > 1 ? atol(argv[1]) : 20000;
	long i;
	size_t size, k;

	for (i = 0; i < runs; i++) {
		/* Mostly short, sometimes page-sized or far past any limit. */
		switch (next() % 4) {
		case 0:
			size = next() % 16;
			break;
		case 1:
			size = next() % 300;
			break;
		case 2:
			size = next() % 5000;
			break;
		default:
			size = next() % sizeof(buf);
			break;
		}
		for (k = 0; k < size; k++)
			buf[k] = next() % 3 ? (uint8_t)alphabet[next() % 35] :
			       (uint8_t)next();
		if (size)
			buf[0] = (uint8_t)i;
		LLVMFuzzerTestOneInput(buf, size);
	}
	printf("fuzz_policy: %ld inputs, no crash\n", runs);
	return 0;
}
#endif
