/*
 * ssi-check: in-guest multi-threaded SMP correctness checker for ssi-vmm.
 *
 *   ssi-check [--seconds S] [--threads N] [--mem MB] [--mem-own 0|1] [--watchdog S]
 *   (--mem-own 1: each thread checks only its own share: memory aggregation, no page moves)
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
 * Self-test builds (each must end with mismatches > 0):
 *   -DBREAK_LOCKS  lock/unlock do nothing and the fetch_add is a plain load + store;
 *   -DBREAK_RINGS  the producer publishes head before it writes the records;
 *   -DBREAK_MEM    from pass 2 on, writers skip the first page of their share.
 *
 * Build: gcc -O2 -static -pthread -Wall -Wextra -Werror -o ssi-check ssi-check.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <sched.h>
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
static int mem_own;
static double vector_s, tlb_s; /* --vector S: only the vector-register check, S seconds */ /* --mem-own 1: each thread verifies its own share (memory aggregation) */
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
             "  --seconds S   total time budget of the phases (default 20)\n"
             "  --threads N   worker threads (default: online CPUs)\n"
             "  --mem MB      memory phase buffer in MiB (default 0: no memory phase)\n"
             "  --mem-own 1   each thread verifies its own share (no cross-thread check)\n"
             "  --vector S    only check that vector registers survive context switches (S s)\n"
             "  --tlb S       only run mprotect() flips that need TLB shootdowns (S s)\n"
             "  --watchdog S  give up on a phase S seconds after its time (default 600)\n");
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

/* ---- vector registers across context switches (--vector S) -------------------------------- */

/* Each round keeps a pattern in a vector register across sched_yield(), in one asm block so the
 * compiler cannot spill it: with two threads per CPU the yield switches tasks, and the kernel
 * must save and restore the whole register. A guest kernel that saves less than user code uses
 * (FXSAVE only, while AVX/AVX-512 are usable) loses it. */
static volatile int vec_stop;
static uint64_t vec_rounds[2 * MAX_THREADS], vec_bad[2 * MAX_THREADS];
static int vec_kind; /* 0 sse, 1 avx2, 2 avx512 */

__attribute__((target("avx2"))) static int vec_round_avx2(const uint64_t *in, uint64_t *out)
{
  __asm__ volatile("vmovdqu (%0), %%ymm7\n\t"
                   "mov $24, %%eax\n\t"
                   "syscall\n\t"
                   "vmovdqu %%ymm7, (%1)\n\t"
                   :
                   : "r"(in), "r"(out)
                   : "rax", "rcx", "r11", "memory", "xmm7");
  return memcmp(in, out, 32) != 0;
}

__attribute__((target("avx512f,avx512vl"))) static int vec_round_avx512(const uint64_t *in,
                                                                         uint64_t *out)
{
  __asm__ volatile("vmovdqu64 (%0), %%zmm16\n\t"
                   "mov $24, %%eax\n\t"
                   "syscall\n\t"
                   "vmovdqu64 %%zmm16, (%1)\n\t"
                   :
                   : "r"(in), "r"(out)
                   : "rax", "rcx", "r11", "memory", "xmm16");
  return memcmp(in, out, 64) != 0;
}

static int vec_round_sse(const uint64_t *in, uint64_t *out)
{
  __asm__ volatile("movdqu (%0), %%xmm7\n\t"
                   "mov $24, %%eax\n\t"
                   "syscall\n\t"
                   "movdqu %%xmm7, (%1)\n\t"
                   :
                   : "r"(in), "r"(out)
                   : "rax", "rcx", "r11", "memory", "xmm7");
  return memcmp(in, out, 16) != 0;
}

static void *vec_main(void *arg)
{
  int idx = (int)(intptr_t)arg;
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpulist[(idx / 2) % ncpulist], &set);
  sched_setaffinity(0, sizeof set, &set);
  uint64_t in[8] __attribute__((aligned(64))), out[8] __attribute__((aligned(64)));
  uint64_t x = 0x9e3779b97f4a7c15ULL * (uint64_t)(idx + 1);
  while (!vec_stop) {
    for (int k = 0; k < 8; k++) {
      x ^= x << 13;
      x ^= x >> 7;
      x ^= x << 17;
      in[k] = x;
    }
    int bad = vec_kind == 2   ? vec_round_avx512(in, out)
              : vec_kind == 1 ? vec_round_avx2(in, out)
                              : vec_round_sse(in, out);
    vec_rounds[idx]++;
    if (bad && vec_bad[idx]++ < 3)
      printf("ssi-check: MISMATCH vector: thread %d round %" PRIu64 ": %#" PRIx64
             " came back as %#" PRIx64 "\n",
             idx, vec_rounds[idx], in[0], out[0]);
  }
  return NULL;
}

static int vector_check(double secs)
{
  __builtin_cpu_init();
  vec_kind = __builtin_cpu_supports("avx512vl") ? 2 : __builtin_cpu_supports("avx2") ? 1 : 0;
  int n = 2 * ncpulist;
  if (n > 2 * MAX_THREADS) n = 2 * MAX_THREADS;
  pthread_t t[2 * MAX_THREADS];
  for (int i = 0; i < n; i++) pthread_create(&t[i], NULL, vec_main, (void *)(intptr_t)i);
  struct timespec d = {(time_t)secs, (long)((secs - (double)(time_t)secs) * 1e9)};
  nanosleep(&d, NULL);
  vec_stop = 1;
  uint64_t rounds = 0, bad = 0;
  for (int i = 0; i < n; i++) {
    pthread_join(t[i], NULL);
    rounds += vec_rounds[i];
    bad += vec_bad[i];
  }
  printf("SSI-CHECK-VECTOR: registers=%s threads=%d rounds=%" PRIu64 " mismatches=%" PRIu64 "\n",
         vec_kind == 2 ? "zmm16" : vec_kind == 1 ? "ymm7" : "xmm7", n, rounds, bad);
  return bad ? 1 : 0;
}

/* ---- TLB shootdowns (--tlb S) --------------------------------------------------------------- */

/* Thread 0 flips a shared page between read-write and read-only with mprotect() and rewrites
 * it, while the other threads (pinned to the other CPUs, so the mm is live there) keep reading
 * it. Each downgrade must flush the other CPUs' TLBs: the kernel sends TLB-shootdown IPIs and
 * waits for them, so a lost IPI hangs the guest (the watchdog of this mode reports it). Readers
 * check that what they read is a value the writer stored (a generation number and its
 * complement). */
static volatile uint64_t *tlb_page;
static volatile int tlb_stop;
static uint64_t tlb_reads[MAX_THREADS], tlb_bad[MAX_THREADS];

static void *tlb_reader(void *arg)
{
  int idx = (int)(intptr_t)arg;
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpulist[idx % ncpulist], &set);
  sched_setaffinity(0, sizeof set, &set);
  while (!tlb_stop) {
    uint64_t g = __atomic_load_n(&tlb_page[0], __ATOMIC_ACQUIRE);
    uint64_t c = __atomic_load_n(&tlb_page[1], __ATOMIC_ACQUIRE);
    /* The writer stores [1] = ~g before [0] = g (release), so ~c >= g always holds. */
    if (~c < g && tlb_bad[idx]++ < 3)
      printf("ssi-check: MISMATCH tlb: thread %d read generation %" PRIu64 " with complement of %"
             PRIu64 "\n", idx, g, ~c);
    tlb_reads[idx]++;
  }
  return NULL;
}

static int tlb_check(double secs)
{
  void *p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return 2;
  tlb_page = p;
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpulist[0], &set);
  sched_setaffinity(0, sizeof set, &set);
  int n = ncpulist < MAX_THREADS ? ncpulist : MAX_THREADS;
  pthread_t t[MAX_THREADS];
  for (int i = 1; i < n; i++) pthread_create(&t[i], NULL, tlb_reader, (void *)(intptr_t)i);
  struct timespec start, now;
  clock_gettime(CLOCK_MONOTONIC, &start);
  uint64_t gen = 0, flips = 0;
  int rc = 0;
  for (;;) {
    clock_gettime(CLOCK_MONOTONIC, &now);
    if ((double)(now.tv_sec - start.tv_sec) + (double)(now.tv_nsec - start.tv_nsec) / 1e9 > secs)
      break;
    gen++;
    __atomic_store_n(&tlb_page[1], ~gen, __ATOMIC_RELEASE);
    __atomic_store_n(&tlb_page[0], gen, __ATOMIC_RELEASE);
    if (mprotect(p, 4096, PROT_READ) != 0 || mprotect(p, 4096, PROT_READ | PROT_WRITE) != 0) {
      rc = 2;
      break;
    }
    flips++;
  }
  tlb_stop = 1;
  uint64_t reads = 0, bad = 0;
  for (int i = 1; i < n; i++) {
    pthread_join(t[i], NULL);
    reads += tlb_reads[i];
    bad += tlb_bad[i];
  }
  printf("SSI-CHECK-TLB: cpus=%d flips=%" PRIu64 " reads=%" PRIu64 " mismatches=%" PRIu64 "\n", n,
         flips, reads, bad);
  return rc ? rc : bad ? 1 : 0;
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

  pthread_condattr_t ca;
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  pthread_cond_init(&done_cv, &ca);
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
