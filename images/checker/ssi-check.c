/*
 * ssi-check: in-guest multi-threaded SMP correctness checker for ssi-vmm.
 *
 *   ssi-check [--seconds S] [--threads N] [--mem MB] [--mem-own 0|1] [--watchdog S]
 *   (--mem-own 1: each thread checks only its own share: memory aggregation, no page moves)
 *   ssi-check --vector S [--watchdog S]    (only the vector-register mode, below)
 *   ssi-check --tlb S [--watchdog S]       (only the TLB-shootdown mode, below)
 *
 * One worker thread per online CPU by default, worker i pinned to the i-th CPU of the
 * process's affinity mask (modulo their number). The workers run four phases; the time
 * budget (--seconds, default 20) is split between them (weights 1:1:2:1; the memory phase's
 * share goes to the others with --mem 0). Every phase prints one "ssi-check: phase ..." line.
 *
 *   mutex-counters  64 counters, each on its own 4 KiB page with its own pthread mutex.
 *   spin-counters   the same with a hand-written test-and-test-and-set spinlock.
 *                   Each operation: pick a counter (per-thread xorshift), lock, read, check the
 *                   page's shadow word (at the other end of the page) is ~value, write value+1
 *                   and ~(value+1), count it in the thread's own tally, unlock, then
 *                   atomic fetch_add on a global counter. Checked at the end: every counter ==
 *                   the sum of all threads' tallies for it, the atomic counter == all ops.
 *   rings           one single-producer/single-consumer ring (64 slots of 64-byte records,
 *                   head/tail with acquire/release) for every ordered pair of workers (a
 *                   ring to itself with one worker). Records carry seq, producer, consumer,
 *                   a payload derived from (producer, seq) and a checksum; the consumer checks
 *                   all of it, that seq is consecutive, and that it got all that was sent.
 *   memory          (--mem MB > 0, default 0) an mmap'd buffer of MB MiB in one share per
 *                   worker. In pass k the share s is written by worker (s+k-1)%N with a
 *                   pattern of (address, k) and, after a barrier, verified by worker (s+k)%N
 *                   (a different one unless N == 1). At least 2 passes (the first touches
 *                   every page), more while the phase's time lasts.
 *
 * The hot loops make no system calls: the main thread (not a worker) sleeps for the phase's
 * time and then sets a stop flag the workers poll. It gives up on a phase that has not
 * finished --watchdog seconds (default 600) after its time, printing a TIMEOUT line.
 *
 * Output (stdout, line-buffered): "ssi-check: ..." lines (setup, phases, per-thread CPUs with
 * pinned=yes/no, first few mismatch details), then exactly one final line
 *   SSI-CHECK: threads=N cpus=C ops=X mismatches=M
 * ops = counter increments + ring messages + memory pages verified; mismatches = bad
 * critical sections (shadow word) + counters off their tallies + a bad atomic total + bad
 * ring records or ring totals + bad memory words + threads a phase's watchdog gave up on
 * (then the final line comes early). Exit status 0 iff M == 0,
 * 1 otherwise; 2 for usage or setup errors (then no final line). A failed pin is reported
 * (pinned=no), not counted as a mismatch.
 *
 * Two separate modes, each S seconds, with the same watchdog (a TIMEOUT line, then the final
 * line early, with the threads given up on counted as mismatches, exit status 1):
 *   --vector S  two threads per CPU (pinned) keep a pattern of their own, new every round, in
 *               all user register state the CPU and OS have (CPUID, XGETBV: xmm0-15, the upper
 *               halves of ymm0-15, the upper 256 bits of zmm0-15, zmm16-31, k0-7, MXCSR, the
 *               x87 control word) across sched_yield(), and compare. Prints
 *                 ssi-check: vector covers xmm ymm-hi zmm-hi zmm16-31 k0-7 x87cw mxcsr
 *               (what it covers), then the final line
 *                 SSI-CHECK-VECTOR: registers=LIST threads=N rounds=R mismatches=M
 *               (M: registers that came back different). Exit status 0 iff M == 0 and R > 0.
 *   --tlb S     a writer on the first CPU flips a page between read-write and read-only with
 *               mprotect() as fast as readers on every other CPU acknowledge; readers write
 *               the page in read-write generations and probe it with a write (which must
 *               fault: SIGSEGV, caught) after every downgrade, and check what they read is not
 *               torn. Final line
 *                 SSI-CHECK-TLB: cpus=N flips=F reads=R probes=P faults=X mismatches=M
 *               (M: probes that did not fault, i.e. missed shootdowns, + torn reads + writes
 *               that faulted while read-write). Exit status 0 iff M == 0, F > 0 and R > 0;
 *               2 if mprotect() failed.
 *
 * Self-test builds (each must end with mismatches > 0; build-initramfs.sh runs them):
 *   -DBREAK_LOCKS   lock/unlock do nothing and the fetch_add is a plain load + store;
 *   -DBREAK_RINGS   the producer publishes head before it writes the records (and yields in
 *                   between, so the consumer reads them unwritten even on a busy host);
 *   -DBREAK_MEM     from pass 2 on, writers skip the first page of their share;
 *   -DBREAK_TLB     (--tlb) the writer skips mprotect(PROT_READ) but still publishes the
 *                   read-only generation: every probe lands, as after a missed shootdown;
 *   -DBREAK_VECTOR  (--vector) zmm20 (AVX-512), the upper half of ymm9 (AVX) or xmm7 (SSE
 *                   only) is overwritten after the yield, before it is stored and compared.
 *
 * Build: gcc -std=c11 -O2 -static -pthread -s -Wall -Wextra -Werror -o ssi-check ssi-check.c
 * (no -m flags: the AVX/AVX-512 functions have target attributes and are used only where
 * CPUID and XGETBV say so).
 */
#define _GNU_SOURCE
#include <cpuid.h>
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <sched.h>
#include <setjmp.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define NCOUNTERS 64
#define RING_SLOTS 64
#define MAX_THREADS 1024
#define MAX_REPORTS 10 /* mismatch detail lines per phase */
#define STOP_CHECK 64 /* lock operations between two looks at the stop flag */

enum { PH_MUTEX, PH_SPIN, PH_RINGS, PH_MEM, NPHASES };
static const char *const phase_name[NPHASES] = {"mutex-counters", "spin-counters", "rings",
                                                 "memory"};

/* ---- shared state ------------------------------------------------------------------- */

struct lockhdr {
  pthread_mutex_t mutex; /* mutex set */
  uint32_t spin;         /* spinlock set */
  uint64_t value;
};
/* A counter, its lock and its shadow word (~value) at the other end of its own page. */
struct lockpage {
  struct lockhdr h;
  uint8_t pad[PAGE - sizeof(struct lockhdr) - sizeof(uint64_t)];
  uint64_t shadow;
};
_Static_assert(sizeof(struct lockpage) == PAGE, "lockpage is one page");

struct msg {
  uint64_t seq;
  uint32_t producer;
  uint32_t consumer;
  uint64_t payload[5];
  uint64_t checksum;
};
_Static_assert(sizeof(struct msg) == 64, "64-byte records");

struct ring {
  uint64_t head __attribute__((aligned(64))); /* written by the producer */
  uint64_t tail __attribute__((aligned(64))); /* written by the consumer */
  uint64_t final __attribute__((aligned(64))); /* messages sent, valid once closed */
  uint32_t closed;
  struct msg slots[RING_SLOTS] __attribute__((aligned(64)));
};

/* Per-worker state, each on its own pages (page-aligned in one mmap). */
struct worker {
  pthread_t tid;
  int idx;
  int want_cpu;
  int pin_ok;       /* sched_setaffinity succeeded */
  int cpu_moved;    /* a sched_getcpu sample differed from want_cpu */
  int last_cpu;     /* sched_getcpu at the end */
  uint64_t tally[2][NCOUNTERS]; /* per set (mutex, spin), per counter */
  uint64_t ops[NPHASES];
  uint64_t bad[NPHASES];
  uint64_t mem_passes;
};

static struct {
  uint32_t stop __attribute__((aligned(PAGE))); /* polled by workers: own page */
  uint64_t atomic_ops __attribute__((aligned(PAGE))); /* own page */
  uint32_t mem_go_on[2] __attribute__((aligned(PAGE)));
} ctl __attribute__((aligned(PAGE)));

static int nthreads, ncpus, ncpulist;
static int cpulist[CPU_SETSIZE];
static double seconds = 20.0, watchdog_s = 600.0;
static long mem_mb;
static int mem_own;                /* --mem-own 1: each thread verifies its own share */
static double vector_s, tlb_s;     /* --vector S / --tlb S: only that mode, S seconds */
static struct lockpage *lockpages[2]; /* [set][counter] */
static struct ring *rings;            /* [producer * nthreads + consumer] */
static size_t ring_stride;
static uint64_t *membuf;
static size_t mem_pages;
static struct worker *workers;
static size_t worker_stride;
static pthread_barrier_t start_bar; /* workers + main, at the start of every phase */
static pthread_barrier_t mem_bar;   /* workers, inside the memory phase */
static pthread_mutex_t done_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t done_cv;
static int done_count[NPHASES];
static uint32_t reports[NPHASES];

#define W(i) ((struct worker *)((char *)workers + (size_t)(i) * worker_stride))
#define RING(p, c) ((struct ring *)((char *)rings + ((size_t)(p) * nthreads + (c)) * ring_stride))

/* ---- helpers ------------------------------------------------------------------------ */

static inline uint64_t mix64(uint64_t z) /* splitmix64 finaliser */
{
  z += 0x9e3779b97f4a7c15ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

static inline uint64_t xorshift64(uint64_t *s)
{
  uint64_t x = *s;
  x ^= x << 13;
  x ^= x >> 7;
  x ^= x << 17;
  return *s = x;
}

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

static inline int stopped(void) { return __atomic_load_n(&ctl.stop, __ATOMIC_RELAXED); }

static double now(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void sleep_until(double t)
{
  struct timespec ts;
  ts.tv_sec = (time_t)t;
  ts.tv_nsec = (long)((t - (double)ts.tv_sec) * 1e9);
  if (ts.tv_nsec >= 1000000000L) ts.tv_nsec = 999999999L;
  while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
  }
}

/* Print a mismatch detail line unless MAX_REPORTS were printed for this phase already. */
#define REPORT(phase, ...)                                                         \
  do {                                                                             \
    if (__atomic_fetch_add(&reports[phase], 1, __ATOMIC_RELAXED) < MAX_REPORTS) \
      printf("ssi-check: MISMATCH " __VA_ARGS__);                                  \
  } while (0)

static void sample_cpu(struct worker *w)
{
  int c = sched_getcpu();
  w->last_cpu = c;
  if (c != w->want_cpu) w->cpu_moved = 1;
}

/* ---- locks (BREAK_LOCKS turns them off) ---------------------------------------------- */

static inline void spin_lock(uint32_t *l)
{
#ifndef BREAK_LOCKS
  unsigned spins = 0;
  while (__atomic_exchange_n(l, 1, __ATOMIC_ACQUIRE)) {
    while (__atomic_load_n(l, __ATOMIC_RELAXED)) {
      cpu_relax();
      if (++spins >= 4096) { /* the holder may have been preempted (more threads than CPUs) */
        sched_yield();
        spins = 0;
      }
    }
  }
#else
  (void)l;
#endif
}

static inline void spin_unlock(uint32_t *l)
{
#ifndef BREAK_LOCKS
  __atomic_store_n(l, 0, __ATOMIC_RELEASE);
#else
  (void)l;
#endif
}

static inline void mutex_lock(pthread_mutex_t *m)
{
#ifndef BREAK_LOCKS
  pthread_mutex_lock(m);
#else
  (void)m;
#endif
}

static inline void mutex_unlock(pthread_mutex_t *m)
{
#ifndef BREAK_LOCKS
  pthread_mutex_unlock(m);
#else
  (void)m;
#endif
}

static inline void atomic_count(void)
{
#ifndef BREAK_LOCKS
  __atomic_fetch_add(&ctl.atomic_ops, 1, __ATOMIC_RELAXED);
#else
  __atomic_store_n(&ctl.atomic_ops, __atomic_load_n(&ctl.atomic_ops, __ATOMIC_RELAXED) + 1,
                   __ATOMIC_RELAXED);
#endif
}

/* ---- phase a: locked counters ------------------------------------------------------- */

/* The critical section. Relaxed atomic loads/stores: separate reads and writes (so losing
 * an update is possible without the lock) but no data race in the C sense. */
static inline void bump(struct lockpage *p, uint64_t *tally, int phase, int widx, int c,
                        uint64_t *bad)
{
  uint64_t v = __atomic_load_n(&p->h.value, __ATOMIC_RELAXED);
  uint64_t s = __atomic_load_n(&p->shadow, __ATOMIC_RELAXED);
  if (s != ~v) {
    (*bad)++;
    REPORT(phase, "%s: thread %d counter %d: value %" PRIu64 " shadow %#" PRIx64
                  " (not ~value) inside the lock\n",
           phase_name[phase], widx, c, v, s);
  }
  __atomic_store_n(&p->h.value, v + 1, __ATOMIC_RELAXED);
  __atomic_store_n(&p->shadow, ~(v + 1), __ATOMIC_RELAXED);
  tally[c]++;
}

static void phase_counters(struct worker *w, int phase)
{
  int set = phase == PH_MUTEX ? 0 : 1;
  struct lockpage *pages = lockpages[set];
  uint64_t *tally = w->tally[set];
  uint64_t rng = mix64(0x5eed0000ULL + (uint64_t)w->idx * 2 + (uint64_t)set) | 1;
  uint64_t ops = 0, bad = 0;
  do {
    for (int k = 0; k < STOP_CHECK; k++) {
      int c = (int)(xorshift64(&rng) % NCOUNTERS);
      struct lockpage *p = &pages[c];
      if (set == 0) {
        mutex_lock(&p->h.mutex);
        bump(p, tally, phase, w->idx, c, &bad);
        mutex_unlock(&p->h.mutex);
      } else {
        spin_lock(&p->h.spin);
        bump(p, tally, phase, w->idx, c, &bad);
        spin_unlock(&p->h.spin);
      }
      atomic_count();
    }
    ops += STOP_CHECK;
  } while (!stopped());
  w->ops[phase] = ops;
  w->bad[phase] = bad;
}

/* Main thread, after all workers finished a counter phase: the end-of-phase checks. */
static uint64_t check_counters(int phase, uint64_t *ops_out)
{
  int set = phase == PH_MUTEX ? 0 : 1;
  uint64_t bad = 0, total = 0;
  for (int c = 0; c < NCOUNTERS; c++) {
    uint64_t sum = 0;
    for (int i = 0; i < nthreads; i++) sum += W(i)->tally[set][c];
    total += sum;
    struct lockpage *p = &lockpages[set][c];
    if (p->h.value != sum || p->shadow != ~p->h.value) {
      bad++;
      REPORT(phase, "%s: counter %d = %" PRIu64 ", threads' tallies sum to %" PRIu64
                    " (shadow %s)\n",
             phase_name[phase], c, p->h.value, sum, p->shadow == ~p->h.value ? "ok" : "bad");
    }
  }
  uint64_t a = __atomic_load_n(&ctl.atomic_ops, __ATOMIC_RELAXED);
  if (a != total) {
    bad++;
    REPORT(phase, "%s: atomic counter = %" PRIu64 ", expected %" PRIu64 "\n",
           phase_name[phase], a, total);
  }
  *ops_out = total;
  return bad;
}

/* ---- phase b: message rings --------------------------------------------------------- */

static inline uint64_t payload_word(uint32_t producer, uint64_t seq, int k)
{
  return mix64(((uint64_t)producer << 40) ^ (seq * 8 + (uint64_t)k));
}

static inline uint64_t msg_checksum(const struct msg *m)
{
  uint64_t h = 0xcbf29ce484222325ULL;
  h = mix64(h ^ m->seq);
  h = mix64(h ^ (((uint64_t)m->producer << 32) | m->consumer));
  for (int k = 0; k < 5; k++) h = mix64(h ^ m->payload[k]);
  return h;
}

struct ring_end {
  struct ring *r;
  int peer;
  uint64_t seq;    /* producer: next seq to send; consumer: next seq expected */
  uint64_t cached; /* producer: last tail seen; consumer: last head seen */
  uint64_t pos;    /* consumer: own tail */
};

static int ring_send(struct ring_end *e, int self, int batch)
{
  struct ring *r = e->r;
  int n = 0;
  if (e->seq - e->cached + (uint64_t)batch > RING_SLOTS)
    e->cached = __atomic_load_n(&r->tail, __ATOMIC_ACQUIRE);
  uint64_t room = RING_SLOTS - (e->seq - e->cached);
  if (room == 0) return 0;
  if ((uint64_t)batch > room) batch = (int)room;
#ifdef BREAK_RINGS
  __atomic_store_n(&r->head, e->seq + (uint64_t)batch, __ATOMIC_RELEASE); /* too early */
  sched_yield(); /* and a slow producer: the consumer gets to read the unwritten records */
#endif
  for (; n < batch; n++) {
    uint64_t seq = e->seq + (uint64_t)n;
    struct msg *m = &r->slots[seq % RING_SLOTS];
    m->seq = seq;
    m->producer = (uint32_t)self;
    m->consumer = (uint32_t)e->peer;
    for (int k = 0; k < 5; k++) m->payload[k] = payload_word((uint32_t)self, seq, k);
    m->checksum = msg_checksum(m);
  }
  e->seq += (uint64_t)n;
#ifndef BREAK_RINGS
  __atomic_store_n(&r->head, e->seq, __ATOMIC_RELEASE);
#endif
  return n;
}

/* Consume everything published; returns the number of records (bad ones added to *bad). */
static uint64_t ring_recv(struct ring_end *e, int self, uint64_t *bad)
{
  struct ring *r = e->r;
  if (e->pos == e->cached) e->cached = __atomic_load_n(&r->head, __ATOMIC_ACQUIRE);
  uint64_t n = 0;
  for (; e->pos < e->cached; e->pos++, n++) {
    struct msg *m = &r->slots[e->pos % RING_SLOTS];
    struct msg c = *m; /* one snapshot, checked field by field */
    int seq_ok = c.seq == e->seq;
    int ids_ok = c.producer == (uint32_t)e->peer && c.consumer == (uint32_t)self;
    int sum_ok = c.checksum == msg_checksum(&c);
    int payload_ok = 1;
    for (int k = 0; k < 5; k++) payload_ok &= c.payload[k] == payload_word(c.producer, c.seq, k);
    if (!(seq_ok && ids_ok && sum_ok && payload_ok)) {
      (*bad)++;
      REPORT(PH_RINGS, "rings: %d->%d slot %" PRIu64 ": seq %" PRIu64 " (want %" PRIu64
                       ") producer %u consumer %u checksum %s payload %s\n",
             e->peer, self, e->pos, c.seq, e->seq, c.producer, c.consumer, sum_ok ? "ok" : "bad",
             payload_ok ? "ok" : "bad");
      /* A well-formed record with an unexpected seq: messages were lost or repeated;
       * continue counting from it so that one gap is one mismatch. */
      if (!seq_ok && ids_ok && sum_ok && payload_ok) e->seq = c.seq;
    }
    e->seq++;
    /* Poison the slot so a record read before the producer rewrote it shows up. */
    m->seq = UINT64_MAX;
    m->checksum = 0;
  }
  if (n) __atomic_store_n(&r->tail, e->pos, __ATOMIC_RELEASE);
  return n;
}

static void phase_rings(struct worker *w)
{
  int self = w->idx, n = nthreads, nout = 0, nin = 0;
  struct ring_end *out = calloc((size_t)n, sizeof *out);
  struct ring_end *in = calloc((size_t)n, sizeof *in);
  uint64_t got = 0, bad = 0, idle = 0;
  if (!out || !in) {
    printf("ssi-check: thread %d: out of memory for ring state\n", self);
    w->bad[PH_RINGS] = 1;
    free(out);
    free(in);
    return;
  }
  for (int j = 0; j < n; j++) {
    if (j == self && n > 1) continue;
    out[nout++] = (struct ring_end){.r = RING(self, j), .peer = j};
    in[nin++] = (struct ring_end){.r = RING(j, self), .peer = j};
  }
  do {
    uint64_t progress = 0;
    for (int k = 0; k < nout; k++) progress += (uint64_t)ring_send(&out[k], self, 8);
    for (int k = 0; k < nin; k++) {
      uint64_t g = ring_recv(&in[k], self, &bad);
      got += g;
      progress += g;
    }
    if (progress) {
      idle = 0;
    } else if (++idle >= 100000) { /* peers not running (more threads than CPUs?) */
      sched_yield();
      idle = 0;
    }
  } while (!stopped());
  for (int k = 0; k < nout; k++) {
    __atomic_store_n(&out[k].r->final, out[k].seq, __ATOMIC_RELAXED);
    __atomic_store_n(&out[k].r->closed, 1, __ATOMIC_RELEASE);
  }
  /* Drain until every producer has closed its ring and all it sent is consumed. */
  for (int open = nin; open > 0;) {
    open = 0;
    for (int k = 0; k < nin; k++) {
      struct ring_end *e = &in[k];
      if (e->r == NULL) continue;
      int closed = (int)__atomic_load_n(&e->r->closed, __ATOMIC_ACQUIRE);
      e->cached = __atomic_load_n(&e->r->head, __ATOMIC_ACQUIRE);
      got += ring_recv(e, self, &bad);
      if (!closed) {
        open++;
        continue;
      }
      uint64_t final = __atomic_load_n(&e->r->final, __ATOMIC_RELAXED);
      if (e->pos == e->cached) {
        if (final != e->pos || e->seq != final) {
          bad++;
          REPORT(PH_RINGS, "rings: %d->%d: producer sent %" PRIu64 ", consumer got %" PRIu64
                           " (next seq %" PRIu64 ")\n",
                 e->peer, self, final, e->pos, e->seq);
        }
        e->r = NULL;
      } else {
        open++;
      }
    }
    if (open) {
      if (++idle >= 1000) {
        sched_yield();
        idle = 0;
      } else {
        cpu_relax();
      }
    }
  }
  w->ops[PH_RINGS] = got;
  w->bad[PH_RINGS] = bad;
  free(out);
  free(in);
}

/* ---- phase c: memory ---------------------------------------------------------------- */

static inline uint64_t mem_pattern(const uint64_t *addr, uint64_t pass)
{
  return mix64((uint64_t)(uintptr_t)addr ^ (pass * 0xd6e8feb86659fd93ULL));
}

static void share_range(int s, size_t *first, size_t *end)
{
  *first = mem_pages * (size_t)s / (size_t)nthreads;
  *end = mem_pages * (size_t)(s + 1) / (size_t)nthreads;
}

static void phase_mem(struct worker *w)
{
  int n = nthreads, self = w->idx;
  uint64_t bad = 0, pages_checked = 0, pass = 1;
  const size_t words = PAGE / sizeof(uint64_t);
  for (;; pass++) {
    size_t first, end;
    /* write: share (self - pass + 1) mod n */
    int s = mem_own ? self : (int)(((uint64_t)self + (uint64_t)n * pass - (pass - 1)) % (uint64_t)n);
    share_range(s, &first, &end);
    for (size_t pg = first; pg < end; pg++) {
#ifdef BREAK_MEM
      if (pass >= 2 && pg == first) continue;
#endif
      uint64_t *p = membuf + pg * words;
      for (size_t k = 0; k < words; k++) p[k] = mem_pattern(&p[k], pass);
    }
    /* Whether there is another pass: decided by worker 0 before the barrier (so everyone
     * sees it after), in a slot by pass parity: slot pass%2 is written again only in pass
     * pass+2, after the barrier of pass+1, which all workers pass after reading it below. */
    if (self == 0)
      __atomic_store_n(&ctl.mem_go_on[pass & 1], pass < 2 || !stopped(), __ATOMIC_RELAXED);
    pthread_barrier_wait(&mem_bar);
    /* verify: share (self - pass) mod n, written by another worker (unless n == 1) */
    s = mem_own ? self : (int)(((uint64_t)self + (uint64_t)n * pass - pass) % (uint64_t)n);
    share_range(s, &first, &end);
    for (size_t pg = first; pg < end; pg++) {
      uint64_t *p = membuf + pg * words;
      uint64_t page_bad = 0;
      for (size_t k = 0; k < words; k++) {
        uint64_t want = mem_pattern(&p[k], pass);
        if (p[k] != want) {
          if (!page_bad)
            REPORT(PH_MEM, "memory: pass %" PRIu64 " page %zu (share %d, checked by thread %d)"
                           ": word %zu = %#" PRIx64 ", want %#" PRIx64 "\n",
                   pass, pg, s, self, k, p[k], want);
          page_bad++;
        }
      }
      bad += page_bad;
      pages_checked++;
    }
    /* The verifier of share s in this pass is its writer in the next one: no barrier
     * needed before writing again. */
    if (!__atomic_load_n(&ctl.mem_go_on[pass & 1], __ATOMIC_RELAXED)) break;
  }
  w->ops[PH_MEM] = pages_checked;
  w->bad[PH_MEM] = bad;
  w->mem_passes = pass;
}

/* ---- threads ------------------------------------------------------------------------ */

static void *worker_main(void *arg)
{
  struct worker *w = arg;
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(w->want_cpu, &set);
  w->pin_ok = sched_setaffinity(0, sizeof set, &set) == 0;
  for (int ph = 0; ph < NPHASES; ph++) {
    pthread_barrier_wait(&start_bar);
    sample_cpu(w);
    switch (ph) {
      case PH_MUTEX:
      case PH_SPIN: phase_counters(w, ph); break;
      case PH_RINGS: phase_rings(w); break;
      case PH_MEM:
        if (membuf) phase_mem(w);
        break;
    }
    sample_cpu(w);
    pthread_mutex_lock(&done_mu);
    if (++done_count[ph] == nthreads) pthread_cond_signal(&done_cv);
    pthread_mutex_unlock(&done_mu);
  }
  return NULL;
}

static void *map_pages(size_t bytes, const char *what)
{
  void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    printf("ssi-check: cannot map %zu bytes for %s: %s\n", bytes, what, strerror(errno));
    exit(2);
  }
  return p;
}

static void usage(FILE *f)
{
  fprintf(f, "usage: ssi-check [--seconds S] [--threads N] [--mem MB] [--mem-own 0|1] [--watchdog S]\n"
             "       ssi-check --vector S [--watchdog S]\n"
             "       ssi-check --tlb S [--watchdog S]\n"
             "  --seconds S   total time budget of the phases (default 20)\n"
             "  --threads N   worker threads (default: online CPUs)\n"
             "  --mem MB      memory phase buffer in MiB (default 0: no memory phase)\n"
             "  --mem-own 1   each thread verifies its own share (no cross-thread check)\n"
             "  --vector S    only check that vector/FPU state survives context switches (S s)\n"
             "  --tlb S       only check TLB shootdowns: mprotect() flips, write probes (S s)\n"
             "  --watchdog S  give up on a phase or mode S seconds after its time (default 600)\n");
}

static double num_arg(const char *opt, const char *s, double lo, double hi)
{
  char *end;
  errno = 0;
  double v = strtod(s, &end);
  if (errno || end == s || *end || !(v >= lo && v <= hi)) {
    fprintf(stderr, "ssi-check: bad value for %s: '%s' (want %g..%g)\n", opt, s, lo, hi);
    exit(2);
  }
  return v;
}

/* ---- the separate modes (--vector, --tlb): threads and watchdog ----------------------------- */

/* Like the phases: the mode's time is up when ctl.stop (own page) is raised. Shared data the
 * threads write often is on pages of its own (a guest's pages may move between hosts). */
static int mode_done; /* threads that finished (under done_mu) */

static void mode_thread_done(void)
{
  pthread_mutex_lock(&done_mu);
  mode_done++;
  pthread_cond_signal(&done_cv);
  pthread_mutex_unlock(&done_mu);
}

/* Main thread: sleeps until t0 + secs, raises ctl.stop, then waits for n threads to call
 * mode_thread_done() until --watchdog seconds after that; returns how many did. */
static int mode_wait(double t0, double secs, int n)
{
  sleep_until(t0 + secs);
  __atomic_store_n(&ctl.stop, 1, __ATOMIC_RELAXED);
  double limit = t0 + secs + watchdog_s;
  struct timespec ts = {.tv_sec = (time_t)limit,
                        .tv_nsec = (long)((limit - (double)(time_t)limit) * 1e9)};
  pthread_mutex_lock(&done_mu);
  while (mode_done < n)
    if (pthread_cond_timedwait(&done_cv, &done_mu, &ts) == ETIMEDOUT) break;
  int finished = mode_done;
  pthread_mutex_unlock(&done_mu);
  return finished;
}

static int pin_to(int cpu)
{
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  return sched_setaffinity(0, sizeof set, &set) == 0;
}

/* Counters their thread bumps while the main thread may read them (TIMEOUT lines). */
static inline void count(uint64_t *c, uint64_t d)
{
  __atomic_store_n(c, __atomic_load_n(c, __ATOMIC_RELAXED) + d, __ATOMIC_RELAXED);
}

static inline uint64_t peek(const uint64_t *c) { return __atomic_load_n(c, __ATOMIC_RELAXED); }

/* ---- vector registers across context switches (--vector S) -------------------------------- */

/* Two threads per CPU (pinned) each load a pattern of their own, new every round, into all the
 * user register state the CPU has and the OS enabled (CPUID, XGETBV(0)), call sched_yield()
 * (the `syscall` instruction, in the same asm block: nothing can be spilled), store it all back
 * and compare:
 *   always          xmm0-15 (XSAVE component 1), MXCSR, the x87 control word (component 0);
 *   AVX             the upper halves of ymm0-15 (component 2; CPUID.1:ECX OSXSAVE+AVX, XCR0
 *                   bits 1 and 2);
 *   AVX-512F        the upper 256 bits of zmm0-15 (ZMM_Hi256, 6), zmm16-31 (Hi16_ZMM, 7),
 *                   k0-7 (opmask, 5; CPUID.7.0:EBX bit 16, XCR0 bits 5-7); 64-bit masks with
 *                   AVX512BW (bit 30, kmovq), else 16-bit (kmovw).
 * The yield switches to the CPU's other thread, so the kernel must save and restore all of it
 * (XSAVE, XRSTOR and variants, which the VMM emulates, merging components). Every 8th round
 * the upper halves, zmm16-31 and k0-7 are zero and vzeroupper puts components 2 and 6 in
 * their initial state: a restore that leaves stale values where XSTATE_BV says "initial"
 * shows up there.
 * MXCSR keeps all exceptions masked; its rounding control (never round-to-nearest),
 * flush-to-zero and sticky flags vary. The x87 control word keeps all exceptions masked; its
 * rounding (never nearest) and precision control vary. Both are restored inside the block. */
struct vecregs {
  uint64_t z[32][8]; /* zmm0-31; xmm/ymm are their first 16/32 bytes */
  uint64_t k[8];
  uint32_t mxcsr, saved_mxcsr;
  uint16_t fcw, saved_fcw;
} __attribute__((aligned(64)));
/* The asm below addresses the fields by these offsets. */
_Static_assert(offsetof(struct vecregs, k) == 2048 && offsetof(struct vecregs, mxcsr) == 2112 &&
                   offsetof(struct vecregs, saved_mxcsr) == 2116 &&
                   offsetof(struct vecregs, fcw) == 2120 &&
                   offsetof(struct vecregs, saved_fcw) == 2122,
               "vecregs layout");

enum { V_XMM = 1, V_YMMHI = 2, V_ZMMHI = 4, V_HI16 = 8, V_K = 16, V_X87CW = 32, V_MXCSR = 64 };
static const char *const vec_names[] = {"xmm", "ymm-hi", "zmm-hi", "zmm16-31",
                                        "k0-7", "x87cw", "mxcsr"};
static unsigned vec_cover;
static uint64_t vec_kmask; /* bits of a k register covered: 64 (kmovq) or 16 (kmovw) */
static void (*vec_round)(const struct vecregs *in, struct vecregs *out, int zinit);

struct vec_thread { /* one page each */
  uint64_t rounds, bad;
  int cpu, pin_ok;
} __attribute__((aligned(PAGE)));
static struct vec_thread *vec_t;

#define R8(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7)
#define R16(M) R8(M) M(8) M(9) M(10) M(11) M(12) M(13) M(14) M(15)
#define R16_31(M) \
  M(16) M(17) M(18) M(19) M(20) M(21) M(22) M(23) M(24) M(25) M(26) M(27) M(28) M(29) M(30) M(31)
#define LD_XMM(i) "movdqu " #i "*64(%0), %%xmm" #i "\n\t"
#define ST_XMM(i) "movdqu %%xmm" #i ", " #i "*64(%1)\n\t"
#define LD_YMM(i) "vmovdqu " #i "*64(%0), %%ymm" #i "\n\t"
#define ST_YMM(i) "vmovdqu %%ymm" #i ", " #i "*64(%1)\n\t"
#define LD_ZMM(i) "vmovdqu64 " #i "*64(%0), %%zmm" #i "\n\t"
#define ST_ZMM(i) "vmovdqu64 %%zmm" #i ", " #i "*64(%1)\n\t"
#define LD_KQ(i) "kmovq 2048+" #i "*8(%0), %%k" #i "\n\t"
#define ST_KQ(i) "kmovq %%k" #i ", 2048+" #i "*8(%1)\n\t"
#define LD_KW(i) "kmovw 2048+" #i "*8(%0), %%k" #i "\n\t"
#define ST_KW(i) "kmovw %%k" #i ", 2048+" #i "*8(%1)\n\t"
/* Save the caller's MXCSR / x87 control word into out, load in's. */
#define CTL_LOAD "fnstcw 2122(%1)\n\tstmxcsr 2116(%1)\n\tldmxcsr 2112(%0)\n\tfldcw 2120(%0)\n\t"
/* Store them into out, restore the caller's. */
#define CTL_STORE "stmxcsr 2112(%1)\n\tfnstcw 2120(%1)\n\tldmxcsr 2116(%1)\n\tfldcw 2122(%1)\n\t"
#define YIELD "mov $24, %%eax\n\tsyscall\n\t" /* sched_yield(): clobbers rax, rcx, r11 */
/* zinit rounds: components 2 (and 6) to their initial state (the values are zero already). */
#define VZU_IF_ZINIT "test %2, %2\n\tjz 1f\n\tvzeroupper\n1:\n\t"
#ifdef BREAK_VECTOR /* corrupt one register after the yield, before it is stored */
#define BREAK_X "pcmpeqd %%xmm7, %%xmm7\n\t"                  /* xmm7 := all ones */
#define BREAK_Y "vinsertf128 $1, %%xmm0, %%ymm9, %%ymm9\n\t"  /* ymm9's upper half := xmm0 */
#define BREAK_Z "vpternlogd $0xff, %%zmm20, %%zmm20, %%zmm20\n\t" /* zmm20 := all ones */
#else
#define BREAK_X ""
#define BREAK_Y ""
#define BREAK_Z ""
#endif
#define CLOBBER_SYSCALL "rax", "rcx", "r11", "memory", "cc"
#define CLOBBER_XMM0_15                                                                       \
  "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10",    \
      "xmm11", "xmm12", "xmm13", "xmm14", "xmm15"
#define CLOBBER_XMM16_31                                                                      \
  "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22", "xmm23", "xmm24", "xmm25",   \
      "xmm26", "xmm27", "xmm28", "xmm29", "xmm30", "xmm31"
#define CLOBBER_K "k0", "k1", "k2", "k3", "k4", "k5", "k6", "k7"

static void vec_round_sse(const struct vecregs *in, struct vecregs *out, int zinit)
{
  (void)zinit;
  __asm__ volatile(CTL_LOAD R16(LD_XMM) YIELD BREAK_X R16(ST_XMM) CTL_STORE
                   :
                   : "r"(in), "r"(out)
                   : CLOBBER_SYSCALL, CLOBBER_XMM0_15);
}

__attribute__((target("avx"))) static void vec_round_avx(const struct vecregs *in,
                                                         struct vecregs *out, int zinit)
{
  __asm__ volatile(CTL_LOAD R16(LD_YMM) VZU_IF_ZINIT YIELD BREAK_Y R16(ST_YMM) CTL_STORE
                   "vzeroupper\n\t"
                   :
                   : "r"(in), "r"(out), "r"(zinit)
                   : CLOBBER_SYSCALL, CLOBBER_XMM0_15);
}

__attribute__((target("avx512f"))) static void vec_round_avx512_kw(const struct vecregs *in,
                                                                   struct vecregs *out, int zinit)
{
  __asm__ volatile(CTL_LOAD R16(LD_ZMM) R16_31(LD_ZMM) R8(LD_KW) VZU_IF_ZINIT YIELD BREAK_Z
                   R16(ST_ZMM) R16_31(ST_ZMM) R8(ST_KW) CTL_STORE "vzeroupper\n\t"
                   :
                   : "r"(in), "r"(out), "r"(zinit)
                   : CLOBBER_SYSCALL, CLOBBER_XMM0_15, CLOBBER_XMM16_31, CLOBBER_K);
}

__attribute__((target("avx512f,avx512bw"))) static void vec_round_avx512_kq(
    const struct vecregs *in, struct vecregs *out, int zinit)
{
  __asm__ volatile(CTL_LOAD R16(LD_ZMM) R16_31(LD_ZMM) R8(LD_KQ) VZU_IF_ZINIT YIELD BREAK_Z
                   R16(ST_ZMM) R16_31(ST_ZMM) R8(ST_KQ) CTL_STORE "vzeroupper\n\t"
                   :
                   : "r"(in), "r"(out), "r"(zinit)
                   : CLOBBER_SYSCALL, CLOBBER_XMM0_15, CLOBBER_XMM16_31, CLOBBER_K);
}

/* What the CPU has and the OS enabled; sets vec_cover, vec_kmask, vec_round. */
static void vec_detect(unsigned *ecx1, unsigned *ebx7, uint64_t *xcr0)
{
  unsigned a = 0, b = 0, c = 0, d = 0;
  *ecx1 = *ebx7 = 0;
  *xcr0 = 0;
  if (__get_cpuid(1, &a, &b, &c, &d)) *ecx1 = c;
  if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) *ebx7 = b;
  if (*ecx1 & (1u << 27)) { /* OSXSAVE: XGETBV is there */
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    *xcr0 = (uint64_t)hi << 32 | lo;
  }
  int avx = (*ecx1 & (1u << 28)) && (*xcr0 & 0x6) == 0x6;
  int avx512 = avx && (*ebx7 & (1u << 16)) && (*xcr0 & 0xe0) == 0xe0;
  int bw = avx512 && (*ebx7 & (1u << 30));
  vec_cover = V_XMM | V_X87CW | V_MXCSR;
  vec_kmask = 0;
  vec_round = vec_round_sse;
  if (avx) {
    vec_cover |= V_YMMHI;
    vec_round = vec_round_avx;
  }
  if (avx512) {
    vec_cover |= V_ZMMHI | V_HI16 | V_K;
    vec_kmask = bw ? UINT64_MAX : 0xffff;
    vec_round = bw ? vec_round_avx512_kq : vec_round_avx512_kw;
  }
}

/* The pattern of (thread, round); zinit: zero upper halves, zmm16-31 and masks. */
static void vec_fill(struct vecregs *in, int idx, uint64_t round, int zinit)
{
  uint64_t x = mix64(((uint64_t)idx << 40) ^ round) | 1;
  for (int r = 0; r < 32; r++)
    for (int q = 0; q < 8; q++) {
      uint64_t v = xorshift64(&x);
      in->z[r][q] = zinit && (r >= 16 || q >= 2) ? 0 : v;
    }
  for (int j = 0; j < 8; j++) {
    uint64_t v = xorshift64(&x) & vec_kmask;
    in->k[j] = zinit ? 0 : v;
  }
  uint64_t f = xorshift64(&x);
  /* MXCSR: flags (bits 0-5) from the pattern, all exceptions masked (7-12), rounding 1-3,
   * flush-to-zero every other pair of rounds. */
  in->mxcsr = (uint32_t)((f & 0x3f) | 0x1f80 | (1 + round % 3) << 13 | ((round >> 1) & 1) << 15);
  /* x87: all exceptions masked (bits 0-5, reserved bit 6 set as after FNINIT), precision
   * single/double/extended (0, 2, 3), rounding 1-3. */
  static const unsigned pc[3] = {0, 2, 3};
  in->fcw = (uint16_t)(0x7f | pc[(round / 3) % 3] << 8 | (1 + (round + 1) % 3) << 10);
}

/* Compares what came back; returns the number of registers that differ (reporting the first
 * few of this thread). */
static uint64_t vec_compare(const struct vecregs *in, const struct vecregs *out, int idx,
                            uint64_t round, uint64_t bad_before)
{
  static const struct {
    unsigned cover;
    int r0, r1, q0, q1; /* registers r0..r1, qwords q0..q1-1 */
    const char *pre, *suf;
  } parts[] = {
      {V_XMM, 0, 15, 0, 2, "xmm", ""},
      {V_YMMHI, 0, 15, 2, 4, "ymm", "[255:128]"},
      {V_ZMMHI, 0, 15, 4, 8, "zmm", "[511:256]"},
      {V_HI16, 16, 31, 0, 8, "zmm", ""},
  };
  uint64_t bad = 0;
  for (size_t p = 0; p < sizeof parts / sizeof parts[0]; p++) {
    if (!(vec_cover & parts[p].cover)) continue;
    for (int r = parts[p].r0; r <= parts[p].r1; r++)
      for (int q = parts[p].q0; q < parts[p].q1; q++)
        if (in->z[r][q] != out->z[r][q]) {
          if (bad_before + bad++ < 3)
            printf("ssi-check: MISMATCH vector: thread %d cpu %d round %" PRIu64 ": %s%d%s qword %d"
                   " = %#" PRIx64 ", want %#" PRIx64 "\n",
                   idx, vec_t[idx].cpu, round, parts[p].pre, r, parts[p].suf, q, out->z[r][q],
                   in->z[r][q]);
          break;
        }
  }
  if (vec_cover & V_K)
    for (int j = 0; j < 8; j++)
      if ((out->k[j] & vec_kmask) != in->k[j] && bad_before + bad++ < 3)
        printf("ssi-check: MISMATCH vector: thread %d cpu %d round %" PRIu64 ": k%d = %#" PRIx64
               ", want %#" PRIx64 "\n",
               idx, vec_t[idx].cpu, round, j, out->k[j] & vec_kmask, in->k[j]);
  if (out->mxcsr != in->mxcsr && bad_before + bad++ < 3)
    printf("ssi-check: MISMATCH vector: thread %d cpu %d round %" PRIu64
           ": mxcsr = %#x, want %#x\n",
           idx, vec_t[idx].cpu, round, out->mxcsr, in->mxcsr);
  if (out->fcw != in->fcw && bad_before + bad++ < 3)
    printf("ssi-check: MISMATCH vector: thread %d cpu %d round %" PRIu64
           ": x87 control word = %#x, want %#x\n",
           idx, vec_t[idx].cpu, round, out->fcw, in->fcw);
  return bad;
}

static void *vec_main(void *arg)
{
  int idx = (int)(intptr_t)arg;
  struct vec_thread *t = &vec_t[idx];
  t->pin_ok = pin_to(t->cpu);
  struct vecregs in, out;
  memset(&out, 0, sizeof out);
  uint64_t round = 0;
  do { /* at least one round */
    int zinit = round % 8 == 7;
    vec_fill(&in, idx, round, zinit);
    vec_round(&in, &out, zinit);
    uint64_t b = vec_compare(&in, &out, idx, round, peek(&t->bad));
    round++;
    count(&t->rounds, 1);
    if (b) count(&t->bad, b);
  } while (!stopped());
  mode_thread_done();
  return NULL;
}

static int vector_check(double secs)
{
  unsigned ecx1, ebx7;
  uint64_t xcr0;
  vec_detect(&ecx1, &ebx7, &xcr0);
  char covers[96] = "";
  for (size_t b = 0; b < sizeof vec_names / sizeof vec_names[0]; b++)
    if (vec_cover & (1u << b))
      snprintf(covers + strlen(covers), sizeof covers - strlen(covers), "%s%s", *covers ? "," : "",
               vec_names[b]);
  printf("ssi-check: vector: cpuid.1:ecx=%#x cpuid.7.0:ebx=%#x xcr0=%#" PRIx64 " kmask=%#" PRIx64
#ifdef BREAK_VECTOR
         " BREAK_VECTOR"
#endif
         "\n",
         ecx1, ebx7, xcr0, vec_kmask);
  printf("ssi-check: vector covers");
  for (size_t b = 0; b < sizeof vec_names / sizeof vec_names[0]; b++)
    if (vec_cover & (1u << b)) printf(" %s", vec_names[b]);
  printf("\n");

  int n = 2 * ncpulist, rc = 0;
  if (n > 2 * MAX_THREADS) n = 2 * MAX_THREADS;
  static pthread_t tids[2 * MAX_THREADS];
  vec_t = map_pages(sizeof *vec_t * (size_t)n, "vector threads");
  double t0 = now();
  for (int i = 0; i < n; i++) {
    vec_t[i].cpu = cpulist[(i / 2) % ncpulist];
    int e = pthread_create(&tids[i], NULL, vec_main, (void *)(intptr_t)i);
    if (e) {
      printf("ssi-check: vector: pthread_create %d: %s\n", i, strerror(e));
      n = i;
      rc = 2;
      break;
    }
  }
  int finished = mode_wait(t0, secs, n);
  uint64_t rounds = 0, bad = 0;
  for (int i = 0; i < n; i++) {
    rounds += peek(&vec_t[i].rounds);
    bad += peek(&vec_t[i].bad);
  }
  if (finished < n) {
    printf("ssi-check: vector: TIMEOUT: %d/%d threads finished after %.1f s\n", finished, n,
           now() - t0);
    bad += (uint64_t)(n - finished);
  } else {
    for (int i = 0; i < n; i++) {
      pthread_join(tids[i], NULL);
      if (!vec_t[i].pin_ok) printf("ssi-check: vector: thread %d: pinned=no\n", i);
    }
  }
  printf("SSI-CHECK-VECTOR: registers=%s threads=%d rounds=%" PRIu64 " mismatches=%" PRIu64 "\n",
         covers, n, rounds, bad);
  if (finished < n) {
    fflush(stdout);
    _exit(1);
  }
  return rc ? rc : bad || rounds == 0 ? 1 : 0;
}

/* ---- TLB shootdowns (--tlb S) --------------------------------------------------------------- */

/* A writer thread on the first CPU flips one page between read-write and read-only with
 * mprotect(), as fast as the readers (one per other CPU, pinned, so the mm is live there)
 * acknowledge, without sleeping. The generation counts the steps, even = read-write, odd =
 * read-only; the writer publishes it (release) after mprotect() has returned, i.e. after the
 * kernel's TLB shootdown has completed on every CPU.
 *   even  the writer stores a new pair v, ~v in words 0 and 1; every reader writes its own
 *         slot of the page (so its CPU caches a writable translation) and acknowledges the
 *         generation. Once all have: mprotect(PROT_READ), the next (odd) generation.
 *   odd   every reader tries a write to its slot (a probe), which must fault: the SIGSEGV is
 *         caught (per-thread sigsetjmp/siglongjmp). A probe that lands went through a stale
 *         writable TLB entry: the shootdown missed that CPU. The writer checks words 0 and 1
 *         still hold its last pair. Once all readers have acknowledged:
 *         mprotect(PROT_READ|PROT_WRITE), the next even generation; the writer stops there
 *         after the mode's time (at least one flip).
 * All the time the readers also read words 0 and 1 and check that the pair is not torn (v
 * with the complement of an older v). With one CPU the writer probes itself. A write that
 * faults in an even generation is a mismatch too. Shootdown IPIs are waited for: a lost one
 * hangs mprotect(), a reader that stops acknowledging stops the writer; either way the
 * watchdog (--watchdog) ends the run with a TIMEOUT line. System calls in the loops: the
 * writer's mprotect()s, the probes' faults and signals, and sched_yield() after a long wait. */
#define TLB_SLOT0 8 /* words 0 and 1: the writer's pair; readers' slots from word 8 on */
static struct {
  uint64_t gen __attribute__((aligned(PAGE))); /* writer -> readers, own page */
  uint32_t finish;                             /* the writer has stopped */
} tlbc __attribute__((aligned(PAGE)));
struct tlb_ack { /* reader -> writer: the last generation handled; one page each */
  uint64_t gen;
} __attribute__((aligned(PAGE)));
struct tlb_thread { /* statistics, one page each */
  uint64_t reads, probes, faults, landed, flips;
  uint64_t bad; /* torn pairs, writes that faulted in even generations, bad pair read back */
  int cpu, pin_ok;
} __attribute__((aligned(PAGE)));
static struct tlb_ack *tlb_acks;
static struct tlb_thread *tlb_t;
static volatile uint64_t *tlb_page;
static int tlb_n, tlb_err;
static _Thread_local sigjmp_buf tlb_jmp;
static _Thread_local volatile sig_atomic_t tlb_armed;

static void tlb_segv(int sig, siginfo_t *si, void *uc)
{
  (void)uc;
  uintptr_t a = (uintptr_t)si->si_addr, p = (uintptr_t)tlb_page;
  if (tlb_armed && a >= p && a < p + PAGE) {
    tlb_armed = 0;
    siglongjmp(tlb_jmp, 1); /* SA_NODEFER: SIGSEGV is not blocked, no mask to restore */
  }
  signal(sig, SIG_DFL); /* a real crash: the instruction faults again and kills us */
}

/* Stores v to *p; returns 1 if that faulted (SIGSEGV caught), 0 if the store landed. */
static __attribute__((noinline)) int tlb_try_write(volatile uint64_t *p, uint64_t v)
{
  if (sigsetjmp(tlb_jmp, 0)) return 1;
  tlb_armed = 1;
  *p = v;
  tlb_armed = 0;
  return 0;
}

static inline int tlb_may_report(struct tlb_thread *t)
{
  return peek(&t->landed) + peek(&t->bad) < 3;
}

/* Probe: the page is read-only (generation gen), a write must fault. */
static void tlb_probe(struct tlb_thread *t, int idx, volatile uint64_t *slot, uint64_t gen)
{
  count(&t->probes, 1);
  if (tlb_try_write(slot, gen)) {
    count(&t->faults, 1);
    return;
  }
  if (tlb_may_report(t))
    printf("ssi-check: MISMATCH tlb: thread %d cpu %d: a write landed in generation %" PRIu64
           " (page read-only): stale writable TLB entry, the shootdown missed this CPU\n",
           idx, t->cpu, gen);
  count(&t->landed, 1);
}

static void *tlb_reader(void *arg)
{
  int idx = (int)(intptr_t)arg;
  struct tlb_thread *t = &tlb_t[idx];
  t->pin_ok = pin_to(t->cpu);
  volatile uint64_t *slot = &tlb_page[TLB_SLOT0 + (idx - 1) % (PAGE / 8 - TLB_SLOT0)];
  uint64_t seen = UINT64_MAX;
  for (;;) {
    uint64_t g = __atomic_load_n(&tlbc.gen, __ATOMIC_ACQUIRE);
    if (g != seen) {
      if (g & 1) {
        tlb_probe(t, idx, slot, g);
      } else if (tlb_try_write(slot, g)) {
        if (tlb_may_report(t))
          printf("ssi-check: MISMATCH tlb: thread %d cpu %d: a write faulted in generation %" PRIu64
                 " (page read-write)\n",
                 idx, t->cpu, g);
        count(&t->bad, 1);
      }
      seen = g;
      __atomic_store_n(&tlb_acks[idx].gen, g, __ATOMIC_RELEASE);
    }
    uint64_t v = __atomic_load_n(&tlb_page[0], __ATOMIC_ACQUIRE);
    uint64_t c = __atomic_load_n(&tlb_page[1], __ATOMIC_ACQUIRE);
    if (~c < v) { /* the writer stores ~v before v, so ~c >= v always holds */
      if (tlb_may_report(t))
        printf("ssi-check: MISMATCH tlb: thread %d cpu %d: read v=%" PRIu64
               " with the complement of %" PRIu64 "\n",
               idx, t->cpu, v, ~c);
      count(&t->bad, 1);
    }
    count(&t->reads, 1);
    if (__atomic_load_n(&tlbc.finish, __ATOMIC_ACQUIRE)) break;
  }
  mode_thread_done();
  return NULL;
}

/* Writer: wait until every reader has acknowledged generation gen. */
static void tlb_wait_acks(uint64_t gen)
{
  for (int i = 1; i < tlb_n; i++) {
    unsigned spins = 0;
    while (__atomic_load_n(&tlb_acks[i].gen, __ATOMIC_ACQUIRE) != gen) {
      cpu_relax();
      if (++spins >= 100000) { /* that reader is not running (its CPU busy elsewhere?) */
        sched_yield();
        spins = 0;
      }
    }
  }
}

static void *tlb_writer(void *arg)
{
  (void)arg;
  struct tlb_thread *t = &tlb_t[0];
  t->pin_ok = pin_to(t->cpu);
  void *page = (void *)tlb_page;
  uint64_t gen = 0, v = 0;
  for (;;) {
    /* read-write (gen even) */
    v++;
    __atomic_store_n(&tlb_page[1], ~v, __ATOMIC_RELEASE);
    __atomic_store_n(&tlb_page[0], v, __ATOMIC_RELEASE);
    tlb_wait_acks(gen);
#ifndef BREAK_TLB
    if (mprotect(page, PAGE, PROT_READ) != 0) {
      tlb_err = errno;
      break;
    }
#endif /* BREAK_TLB: the page stays writable while the generation says read-only */
    count(&t->flips, 1);
    __atomic_store_n(&tlbc.gen, ++gen, __ATOMIC_RELEASE);
    /* read-only (gen odd) */
    uint64_t g = tlb_page[0], c = tlb_page[1];
    if (g != v || c != ~v) {
      if (tlb_may_report(t))
        printf("ssi-check: MISMATCH tlb: thread 0 cpu %d: after mprotect(PROT_READ) words 0/1 are"
               " %#" PRIx64 "/%#" PRIx64 ", want %#" PRIx64 "/%#" PRIx64 "\n",
               t->cpu, g, c, v, ~v);
      count(&t->bad, 1);
    }
    count(&t->reads, 1);
    if (tlb_n == 1) tlb_probe(t, 0, &tlb_page[TLB_SLOT0], gen);
    tlb_wait_acks(gen);
    if (mprotect(page, PAGE, PROT_READ | PROT_WRITE) != 0) {
      tlb_err = errno;
      break;
    }
    __atomic_store_n(&tlbc.gen, ++gen, __ATOMIC_RELEASE);
    if (stopped()) break;
  }
  __atomic_store_n(&tlbc.finish, 1, __ATOMIC_RELEASE);
  mode_thread_done();
  return NULL;
}

static int tlb_check(double secs)
{
  int n = ncpulist < MAX_THREADS ? ncpulist : MAX_THREADS, rc = 0;
  printf("ssi-check: tlb: cpus=%d seconds=%g watchdog=%g"
#ifdef BREAK_TLB
         " BREAK_TLB"
#endif
         "\n",
         n, secs, watchdog_s);
  tlb_page = map_pages(PAGE, "the tlb page");
  tlb_acks = map_pages(sizeof *tlb_acks * (size_t)n, "tlb acknowledgements");
  tlb_t = map_pages(sizeof *tlb_t * (size_t)n, "tlb threads");
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = tlb_segv;
  sa.sa_flags = SA_SIGINFO | SA_NODEFER;
  sigemptyset(&sa.sa_mask);
  if (sigaction(SIGSEGV, &sa, NULL) != 0) {
    printf("ssi-check: tlb: sigaction: %s\n", strerror(errno));
    return 2;
  }
  static pthread_t tids[MAX_THREADS];
  for (int i = 0; i < n; i++) {
    tlb_acks[i].gen = UINT64_MAX;
    tlb_t[i].cpu = cpulist[i % ncpulist];
  }
  double t0 = now();
  /* Readers first: the writer waits for as many as were started (tlb_n). */
  tlb_n = n;
  for (int i = 1; i < n; i++) {
    int e = pthread_create(&tids[i], NULL, tlb_reader, (void *)(intptr_t)i);
    if (e) {
      printf("ssi-check: tlb: pthread_create %d: %s\n", i, strerror(e));
      tlb_n = n = i;
      rc = 2;
      break;
    }
  }
  int e = pthread_create(&tids[0], NULL, tlb_writer, NULL);
  if (e) {
    printf("ssi-check: tlb: pthread_create writer: %s\n", strerror(e));
    printf("SSI-CHECK-TLB: cpus=%d flips=0 reads=0 probes=0 faults=0 mismatches=0\n", n);
    fflush(stdout);
    _exit(2);
  }
  /* The main thread waits on the last CPU, so it still gets to print TIMEOUT when the writer's
   * CPU is stuck in the kernel (a lost shootdown IPI). */
  if (n > 1) pin_to(cpulist[n - 1]);
  int finished = mode_wait(t0, secs, n);
  uint64_t flips = peek(&tlb_t[0].flips), reads = 0, probes = 0, faults = 0, bad = 0;
  for (int i = 0; i < n; i++) {
    reads += peek(&tlb_t[i].reads);
    probes += peek(&tlb_t[i].probes);
    faults += peek(&tlb_t[i].faults);
    bad += peek(&tlb_t[i].bad);
  }
  /* Every probe must fault: the ones that landed are mismatches. */
  bad += probes > faults ? probes - faults : faults - probes;
  if (finished < n) {
    uint64_t gen = __atomic_load_n(&tlbc.gen, __ATOMIC_ACQUIRE);
    printf("ssi-check: tlb: TIMEOUT: %d/%d threads finished after %.1f s; generation %" PRIu64
           " (%s)",
           finished, n, now() - t0, gen, gen & 1 ? "read-only" : "read-write");
    int shown = 0;
    for (int i = 1; i < n; i++) {
      uint64_t a = __atomic_load_n(&tlb_acks[i].gen, __ATOMIC_ACQUIRE);
      if (a != gen && shown++ < 8)
        printf("%s thread %d cpu %d at %" PRId64, shown == 1 ? ", not acknowledged by:" : ",", i,
               tlb_t[i].cpu, (int64_t)a);
    }
    printf("\n");
    bad += (uint64_t)(n - finished);
  } else {
    for (int i = 0; i < n; i++) {
      pthread_join(tids[i], NULL);
      struct tlb_thread *t = &tlb_t[i];
      printf("ssi-check: tlb: thread %d (%s): cpu=%d pinned=%s reads=%" PRIu64 " probes=%" PRIu64
             " faults=%" PRIu64 " landed=%" PRIu64 " other-mismatches=%" PRIu64 "\n",
             i, i ? "reader" : "writer", t->cpu, t->pin_ok ? "yes" : "no", t->reads, t->probes,
             t->faults, t->landed, t->bad);
    }
    if (tlb_err) {
      printf("ssi-check: tlb: mprotect: %s\n", strerror(tlb_err));
      rc = 2;
    }
  }
  printf("SSI-CHECK-TLB: cpus=%d flips=%" PRIu64 " reads=%" PRIu64 " probes=%" PRIu64
         " faults=%" PRIu64 " mismatches=%" PRIu64 "\n",
         n, flips, reads, probes, faults, bad);
  if (finished < n) {
    fflush(stdout);
    _exit(1);
  }
  return rc ? rc : bad || flips == 0 || reads == 0 ? 1 : 0;
}

int main(int argc, char **argv)
{
  setvbuf(stdout, NULL, _IOLBF, 0);
  long online = sysconf(_SC_NPROCESSORS_ONLN);
  ncpus = online > 0 ? (int)online : 1;
  nthreads = 0;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i], *v = NULL;
    const char *eq = strchr(a, '=');
    char name[32];
    if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
      usage(stdout);
      return 0;
    }
    if (eq && (size_t)(eq - a) < sizeof name) {
      memcpy(name, a, (size_t)(eq - a));
      name[eq - a] = 0;
      v = eq + 1;
    } else {
      snprintf(name, sizeof name, "%s", a);
      if (i + 1 < argc) v = argv[++i];
    }
    if (v == NULL) {
      fprintf(stderr, "ssi-check: %s needs a value\n", name);
      usage(stderr);
      return 2;
    }
    if (strcmp(name, "--seconds") == 0) seconds = num_arg(name, v, 0, 1e6);
    else if (strcmp(name, "--threads") == 0) nthreads = (int)num_arg(name, v, 1, MAX_THREADS);
    else if (strcmp(name, "--mem") == 0) mem_mb = (long)num_arg(name, v, 0, 1 << 20);
    else if (strcmp(name, "--tlb") == 0) tlb_s = num_arg(name, v, 0, 1e6);
    else if (strcmp(name, "--vector") == 0) vector_s = num_arg(name, v, 0, 1e6);
    else if (strcmp(name, "--mem-own") == 0) mem_own = (int)num_arg(name, v, 0, 1);
    else if (strcmp(name, "--watchdog") == 0) watchdog_s = num_arg(name, v, 1, 1e6);
    else {
      fprintf(stderr, "ssi-check: unknown option %s\n", name);
      usage(stderr);
      return 2;
    }
  }
  if (nthreads == 0) nthreads = ncpus > MAX_THREADS ? MAX_THREADS : ncpus;

  /* Pin targets: the CPUs we may run on (normally 0..ncpus-1). */
  cpu_set_t allowed;
  ncpulist = 0;
  if (sched_getaffinity(0, sizeof allowed, &allowed) == 0)
    for (int c = 0; c < CPU_SETSIZE; c++)
      if (CPU_ISSET(c, &allowed)) cpulist[ncpulist++] = c;
  if (ncpulist == 0)
    for (; ncpulist < ncpus && ncpulist < CPU_SETSIZE; ncpulist++) cpulist[ncpulist] = ncpulist;
  pthread_condattr_t ca;
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  pthread_cond_init(&done_cv, &ca);
  if (vector_s > 0) return vector_check(vector_s);
  if (tlb_s > 0) return tlb_check(tlb_s);

  printf("ssi-check: threads=%d cpus=%d seconds=%g mem=%ldMiB"
#ifdef BREAK_LOCKS
         " BREAK_LOCKS"
#endif
#ifdef BREAK_RINGS
         " BREAK_RINGS"
#endif
#ifdef BREAK_MEM
         " BREAK_MEM"
#endif
         "\n",
         nthreads, ncpus, seconds, mem_mb);

  /* Shared memory. */
  for (int set = 0; set < 2; set++) {
    lockpages[set] = map_pages(sizeof(struct lockpage) * NCOUNTERS, "counters");
    for (int c = 0; c < NCOUNTERS; c++) {
      pthread_mutex_init(&lockpages[set][c].h.mutex, NULL);
      lockpages[set][c].shadow = ~(uint64_t)0;
    }
  }
  ring_stride = (sizeof(struct ring) + PAGE - 1) / PAGE * PAGE;
  rings = map_pages(ring_stride * (size_t)nthreads * (size_t)nthreads, "rings");
  worker_stride = (sizeof(struct worker) + PAGE - 1) / PAGE * PAGE;
  workers = map_pages(worker_stride * (size_t)nthreads, "threads");
  if (mem_mb > 0) {
    mem_pages = (size_t)mem_mb * (1024 * 1024 / PAGE);
    membuf = map_pages(mem_pages * PAGE, "memory phase");
  }

  pthread_barrier_init(&start_bar, NULL, (unsigned)nthreads + 1);
  pthread_barrier_init(&mem_bar, NULL, (unsigned)nthreads);

  for (int i = 0; i < nthreads; i++) {
    struct worker *w = W(i);
    w->idx = i;
    w->want_cpu = cpulist[i % ncpulist];
    w->last_cpu = -1;
    int rc = pthread_create(&w->tid, NULL, worker_main, w);
    if (rc) {
      printf("ssi-check: pthread_create %d: %s\n", i, strerror(rc));
      return 2;
    }
  }

  double weight[NPHASES] = {1, 1, 2, membuf ? 1 : 0}, wsum = 0;
  for (int ph = 0; ph < NPHASES; ph++) wsum += weight[ph];
  uint64_t total_ops = 0, total_bad = 0;
  for (int ph = 0; ph < NPHASES; ph++) {
    double budget = seconds * weight[ph] / wsum;
    __atomic_store_n(&ctl.stop, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&ctl.atomic_ops, 0, __ATOMIC_RELAXED);
    pthread_barrier_wait(&start_bar);
    double t0 = now();
    if (ph != PH_MEM || membuf) sleep_until(t0 + budget);
    __atomic_store_n(&ctl.stop, 1, __ATOMIC_RELAXED);

    double limit = t0 + budget + watchdog_s;
    struct timespec ts = {.tv_sec = (time_t)limit,
                          .tv_nsec = (long)((limit - (double)(time_t)limit) * 1e9)};
    pthread_mutex_lock(&done_mu);
    while (done_count[ph] < nthreads)
      if (pthread_cond_timedwait(&done_cv, &done_mu, &ts) == ETIMEDOUT) break;
    int finished = done_count[ph];
    pthread_mutex_unlock(&done_mu);
    double took = now() - t0;
    if (finished < nthreads) {
      total_bad += (uint64_t)(nthreads - finished);
      printf("ssi-check: phase %s: TIMEOUT: %d/%d threads finished after %.1f s\n",
             phase_name[ph], finished, nthreads, took);
      printf("SSI-CHECK: threads=%d cpus=%d ops=%" PRIu64 " mismatches=%" PRIu64 "\n",
             nthreads, ncpus, total_ops, total_bad);
      fflush(stdout);
      _exit(1);
    }

    uint64_t ops = 0, bad = 0;
    for (int i = 0; i < nthreads; i++) bad += W(i)->bad[ph];
    switch (ph) {
      case PH_MUTEX:
      case PH_SPIN: {
        uint64_t atomic = __atomic_load_n(&ctl.atomic_ops, __ATOMIC_RELAXED);
        bad += check_counters(ph, &ops);
        printf("ssi-check: phase %s: counters=%d ops=%" PRIu64 " atomic=%" PRIu64
               " seconds=%.2f mismatches=%" PRIu64 "\n",
               phase_name[ph], NCOUNTERS, ops, atomic, took, bad);
        break;
      }
      case PH_RINGS: {
        for (int i = 0; i < nthreads; i++) ops += W(i)->ops[ph];
        int nrings = nthreads > 1 ? nthreads * (nthreads - 1) : 1;
        printf("ssi-check: phase rings: rings=%d messages=%" PRIu64 " seconds=%.2f"
               " mismatches=%" PRIu64 "\n",
               nrings, ops, took, bad);
        break;
      }
      case PH_MEM:
        if (!membuf) {
          printf("ssi-check: phase memory: skipped (--mem 0)\n");
          break;
        }
        for (int i = 0; i < nthreads; i++) ops += W(i)->ops[ph];
        printf("ssi-check: phase memory: mb=%ld pages=%zu passes=%" PRIu64
               " pages-verified=%" PRIu64 " cross-thread=%s seconds=%.2f mismatches=%" PRIu64
               "\n",
               mem_mb, mem_pages, W(0)->mem_passes, ops, nthreads > 1 && !mem_own ? "yes" : "no", took,
               bad);
        break;
    }
    if (reports[ph] > MAX_REPORTS)
      printf("ssi-check: (%u more mismatch reports in %s not shown)\n",
             reports[ph] - MAX_REPORTS, phase_name[ph]);
    total_ops += ops;
    total_bad += bad;
  }

  int all_pinned = 1;
  for (int i = 0; i < nthreads; i++) {
    struct worker *w = W(i);
    pthread_join(w->tid, NULL);
    int pinned = w->pin_ok && !w->cpu_moved;
    all_pinned &= pinned;
    printf("ssi-check: thread %d: want-cpu=%d cpu=%d pinned=%s\n", i, w->want_cpu, w->last_cpu,
           pinned ? "yes" : "no");
  }
  printf("ssi-check: pinned=%s\n", all_pinned ? "yes" : "no");
  printf("SSI-CHECK: threads=%d cpus=%d ops=%" PRIu64 " mismatches=%" PRIu64 "\n", nthreads,
         ncpus, total_ops, total_bad);
  return total_bad == 0 ? 0 : 1;
}
