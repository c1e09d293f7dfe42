/* One call of a Sparsa cpu function's native host, `sparsa_main`, on a machine that is not the one that compiled
   it: link this file with the function's object code (`--emit obj`, `aot.object_code`) for that machine, give it
   the call that `aot.call_image` wrote, and read back what it writes with `aot.read_results`.

       cc -O1 -static [-fopenmp] runner.c model.o -lm -o runner
       ./runner call.bin results.bin [repeats]

   The image is little-endian int64 words: the number of buffers, each buffer's bytes (a word) and its data; the
   program's argv (its length, then its words); the relocations, argv slots that take a buffer's address (their
   number, then slot and buffer pairs); the output buffers (their number, then their indices). Every buffer is
   64-byte aligned. Built with -fopenmp, the parallel regions run on libgomp's team (argv[1], GOMP_parallel),
   else on this thread. The results file is argv[3] (the status: 0, or 1 + the kernel whose index check failed)
   and then each output's bytes. With `repeats`, the call runs that many times more and the median time of one
   is printed in nanoseconds (the outputs are the first call's). */
#define _POSIX_C_SOURCE 199309L
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

void sparsa_main(int64_t *argv);
#ifdef _OPENMP
void GOMP_parallel(void (*fn)(void *), void *data, unsigned threads, unsigned flags);
#endif

static FILE *image;

static int64_t word(void) {
    int64_t v;
    if (fread(&v, 8, 1, image) != 1) {
        fprintf(stderr, "runner: the call image ends early\n");
        exit(2);
    }
    return v;
}

static int64_t count(int64_t limit, const char *what) {
    int64_t n = word();
    if (n < 0 || n > limit) {
        fprintf(stderr, "runner: %lld %s is out of range\n", (long long)n, what);
        exit(2);
    }
    return n;
}

static int by_value(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

int main(int argc, char **argv) {
    if (argc < 3 || argc > 4) {
        fprintf(stderr, "usage: %s CALL RESULTS [REPEATS]\n", argv[0]);
        return 2;
    }
    image = fopen(argv[1], "rb");
    if (!image) {
        perror(argv[1]);
        return 2;
    }
    int64_t n = count(1 << 20, "buffers");
    char **bufs = calloc(n + 1, sizeof *bufs);
    int64_t *bytes = calloc(n + 1, sizeof *bytes);
    for (int64_t i = 0; i < n; i++) {
        bytes[i] = count(INT64_MAX / 2, "bytes");
        bufs[i] = aligned_alloc(64, (bytes[i] + 63) / 64 * 64 + 64);
        if (!bufs[i] || (bytes[i] && fread(bufs[i], 1, bytes[i], image) != (size_t)bytes[i])) {
            fprintf(stderr, "runner: buffer %lld (%lld bytes) cannot be read\n", (long long)i, (long long)bytes[i]);
            return 2;
        }
    }
    int64_t words = count(1 << 28, "argv words");
    int64_t *prog = calloc(words + 4, 8);
    for (int64_t i = 0; i < words; i++) prog[i] = word();
    int64_t relocs = count(words, "relocations");
    for (int64_t i = 0; i < relocs; i++) {
        int64_t slot = count(words - 1, "slot"), buf = count(n - 1, "buffer");
        prog[slot] = (int64_t)(intptr_t)bufs[buf];
    }
    int64_t outs = count(n, "outputs");
    int64_t *out = calloc(outs + 1, 8);
    for (int64_t i = 0; i < outs; i++) out[i] = count(n - 1, "output buffer");
    fclose(image);
#ifdef _OPENMP
    prog[1] = (int64_t)(intptr_t)&GOMP_parallel;
#else
    prog[1] = 0;
#endif
    sparsa_main(prog);
    FILE *results = fopen(argv[2], "wb");
    if (!results) {
        perror(argv[2]);
        return 2;
    }
    fwrite(&prog[3], 8, 1, results);
    for (int64_t i = 0; i < outs; i++) fwrite(bufs[out[i]], 1, bytes[out[i]], results);
    fclose(results);
    if (argc == 4) {
        int64_t repeats = atoll(argv[3]);
        int64_t *ns = calloc(repeats + 1, 8);
        for (int64_t r = 0; r < repeats; r++) {
            int64_t t = now_ns();
            sparsa_main(prog);
            ns[r] = now_ns() - t;
        }
        qsort(ns, repeats, 8, by_value);
        if (repeats > 0) printf("median_ns %lld\n", (long long)ns[repeats / 2]);
    }
    return 0;
}
