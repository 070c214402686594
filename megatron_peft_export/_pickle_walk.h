/* check_pickle's walk in C: the same algorithm as io/torch_save.py's `_walk` (the reference, whose docstrings say
 * why it is sound), opcode by opcode, with the opcode facts (argument sizes, stack effects) taken from the tables
 * Python builds (`_tables`), so both walks read one source. tests/io/test_pickle_walk.py pins that both walks
 * answer the same on generated and hostile pickles.
 *
 * One walk, two users: _pickle_walk.c (check_pickle: walk_step until the walk ends) and _dcp_metadata.c (the
 * `.metadata` reader, which takes one walk_step per opcode it reads, so that a pickle it reads has passed every rule
 * of check_pickle in the same pass). Everything here is static and named walk_* / WALK_*.
 *
 * Every stack and memo entry is steps << 8 | tuple depth as in Python. Bounds that make 64-bit integers enough:
 * a tuple's steps are refused past the pickle's size + 1024 (sums are cut at that bound plus one, which refuses as
 * the unbounded sum would); the hashing budget (4x the size + 64 Ki) is never below zero when an opcode starts, and
 * sums spent from it are cut at the budget plus one. Memo indices stored are at most the pickle's size (checked, as
 * in Python), so the memo array holds at most size + 1 entries. Nothing here touches Python objects: callers may
 * release the GIL around it. */
#ifndef MEGATRON_PEFT_EXPORT_PICKLE_WALK_H
#define MEGATRON_PEFT_EXPORT_PICKLE_WALK_H
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int64_t *v;
    Py_ssize_t n, cap;
} WalkVec;

typedef struct {
    int64_t code, at, a, b;
    int a_unsigned; /* `a` is an unsigned 8-byte length (BINUNICODE8 and its kind) */
} WalkRefusal;

/* walk_step's answers: the opcode passed (go on), the walk ended at STOP (the pickle passes), a refusal (in `out`),
 * no memory */
enum { WALK_OK = 0, WALK_REFUSED = 1, WALK_NO_MEMORY = 2, WALK_DONE = 3 };

static int walk_reserve(WalkVec *s, Py_ssize_t need) {
    if (need <= s->cap) return 0;
    Py_ssize_t cap = s->cap ? s->cap : 64;
    while (cap < need) cap *= 2;
    int64_t *v = realloc(s->v, (size_t)cap * sizeof(int64_t));
    if (v == NULL) return -1;
    s->v = v;
    s->cap = cap;
    return 0;
}

static inline int walk_push(WalkVec *s, int64_t x) {
    if (s->n == s->cap && walk_reserve(s, s->n + 1) < 0) return -1;
    s->v[s->n++] = x;
    return 0;
}

typedef struct {
    int64_t *v; /* -1: never stored */
    uint64_t cap;
    int64_t filled; /* distinct indices stored: where MEMOIZE stores, as in CPython's unpickler */
} WalkMemo;

static int walk_memo_grow(WalkMemo *m, uint64_t key) {
    uint64_t cap = m->cap ? m->cap * 2 : 1024;
    if (cap <= key) cap = key + 1;
    int64_t *v = realloc(m->v, (size_t)cap * sizeof(int64_t));
    if (v == NULL) return -1;
    memset(v + m->cap, 0xff, (size_t)(cap - m->cap) * sizeof(int64_t));
    m->v = v;
    m->cap = cap;
    return 0;
}

static inline int walk_memo_set(WalkMemo *m, uint64_t key, int64_t value) {
    if (key >= m->cap && walk_memo_grow(m, key) < 0) return -1;
    if (m->v[key] < 0) m->filled++;
    m->v[key] = value;
    return 0;
}

static inline int64_t walk_memo_get(const WalkMemo *m, uint64_t key) {
    return key < m->cap && m->v[key] >= 0 ? m->v[key] : 256;
}

/* int.from_bytes(data[pos : pos + n], "little"): fewer bytes at the end of the data */
static inline uint64_t walk_read_le(const unsigned char *d, Py_ssize_t pos, int n, Py_ssize_t end, int *got) {
    int k = 0;
    uint64_t x = 0;
    for (; k < n && pos + k < end; k++) x |= (uint64_t)d[pos + k] << (8 * k);
    if (got) *got = k;
    return x;
}

#define WALK_MAX_TUPLE_DEPTH 100
#define WALK_MAX_INDEX_DIGITS 18
#define WALK_TABLES_LEN (256 * 8)

typedef struct {
    const unsigned char *d;
    Py_ssize_t end;
    const unsigned char *table;
    WalkVec stack, marks;
    WalkMemo memo;
    int64_t budget, tuple_budget;
    Py_ssize_t at, frame, limit; /* the next opcode; as in Python: the current frame (-1: none), where it ends */
    WalkRefusal *out;
} Walk;

/* a walk of `len` bytes at `d` with the tables Python built (WALK_TABLES_LEN bytes), refusals written to `out` */
static void walk_begin(Walk *w, const unsigned char *d, Py_ssize_t len, const unsigned char *table, WalkRefusal *out) {
    memset(w, 0, sizeof(*w));
    memset(out, 0, sizeof(*out));
    w->d = d;
    w->end = len;
    w->table = table;
    w->out = out;
    w->budget = 4 * (int64_t)len + (1 << 16);
    w->tuple_budget = (int64_t)len + 1024;
    w->frame = -1;
    w->limit = len;
}

static void walk_free(Walk *w) {
    free(w->stack.v);
    free(w->marks.v);
    free(w->memo.v);
    w->stack.v = w->marks.v = w->memo.v = NULL;
}

static int walk_refuse(Walk *w, int64_t code, int64_t at, int64_t a, int64_t b) {
    w->out->code = code;
    w->out->at = at;
    w->out->a = a;
    w->out->b = b;
    return WALK_REFUSED;
}

/* _tuple: a new tuple's item, refused when too deep or of more steps than the pickle has bytes */
static inline int walk_new_tuple(Walk *w, int64_t item, Py_ssize_t at) {
    int64_t depth = item & 255;
    if (depth > WALK_MAX_TUPLE_DEPTH) return walk_refuse(w, 8, at, depth, 0);
    if ((item >> 8) > w->tuple_budget) return walk_refuse(w, 9, at, 0, 0);
    return WALK_OK;
}

/* _step: an opcode's effect described by its table row */
static int walk_effect(Walk *w, int op, Py_ssize_t at) {
    WalkVec *s = &w->stack, *m = &w->marks;
    const unsigned char *t = w->table + 8 * op;
    int marked = t[3], below = t[4], leaves = t[5], built = t[6], hashed = t[7];
    if (op == 0x32) /* DUP */
        return walk_push(s, s->n ? s->v[s->n - 1] : 256) < 0 ? WALK_NO_MEMORY : WALK_OK;
    if (op == 0x30 && m->n && m->v[m->n - 1] == s->n) { /* POP of a mark */
        m->n--;
        return WALK_OK;
    }
    Py_ssize_t first = 0, last = 0; /* the items taken: s->v[first:last], still in place until the next push */
    if (marked) {
        int64_t mark = m->n ? m->v[--m->n] : 0;
        if (mark < s->n) {
            first = (Py_ssize_t)mark;
            last = s->n;
            s->n = first;
        }
    }
    if (below > s->n) return walk_refuse(w, 6, at, 0, 0);
    if (below) {
        s->n -= below;
        if (!marked) {
            first = s->n;
            last = s->n + below;
        }
    }
    if (built == 1) {
        int64_t steps = 1, depth = 0;
        for (Py_ssize_t i = first; i < last; i++) {
            if (steps <= w->tuple_budget) steps += s->v[i] >> 8;
            if ((s->v[i] & 255) > depth) depth = s->v[i] & 255;
        }
        if (steps > w->tuple_budget + 1) steps = w->tuple_budget + 1;
        depth += 1;
        int64_t item = steps << 8 | (depth < 255 ? depth : 255);
        int r = walk_new_tuple(w, item, at);
        if (r != WALK_OK) return r;
        return walk_push(s, item) < 0 ? WALK_NO_MEMORY : WALK_OK;
    }
    int64_t result = 256;
    if (built == 2) { /* a call (OBJ, INST, NEWOBJ_EX): what it was given (NEWOBJ_EX: but the class) */
        int64_t steps = 0, depth = 0;
        for (Py_ssize_t i = first + (op == 0x92); i < last; i++) {
            if (steps <= w->tuple_budget) steps += s->v[i] >> 8;
            if ((s->v[i] & 255) > depth) depth = s->v[i] & 255;
        }
        if (steps < 1) steps = 1;
        if (steps > w->tuple_budget + 1) steps = w->tuple_budget + 1;
        result = steps << 8 | (depth < 255 ? depth : 255);
        int r = walk_new_tuple(w, result, at);
        if (r != WALK_OK) return r;
    }
    if (hashed) {
        Py_ssize_t from = first, by = 1, to = last;
        if (hashed == 1) { /* SETITEM: the key, the second item taken */
            from = first + 1;
            to = last - first >= 2 ? first + 2 : first;
        } else if (hashed == 2) { /* every second item from the first: keys */
            by = 2;
        }
        int64_t spent = 0;
        for (Py_ssize_t i = from; i < to; i += by) {
            spent += s->v[i] >> 8;
            if (spent > w->budget) return walk_refuse(w, 7, at, 0, 0);
        }
        w->budget -= spent;
    }
    if (leaves) return walk_push(s, result) < 0 ? WALK_NO_MEMORY : WALK_OK;
    return WALK_OK;
}

static inline int walk_is_space(unsigned char c) {
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == 0x0b || c == 0x0c;
}

/* a PUT or GET line: ASCII digits (surrounding whitespace stripped, as bytes.strip), at most WALK_MAX_INDEX_DIGITS
 * of them, a number at most the pickle's size; -1 otherwise */
static int64_t walk_memo_index(const unsigned char *d, Py_ssize_t from, Py_ssize_t to, Py_ssize_t end) {
    while (from < to && walk_is_space(d[from])) from++;
    while (to > from && walk_is_space(d[to - 1])) to--;
    if (to == from || to - from > WALK_MAX_INDEX_DIGITS) return -1;
    int64_t x = 0;
    for (Py_ssize_t i = from; i < to; i++) {
        if (d[i] < '0' || d[i] > '9') return -1;
        x = x * 10 + (d[i] - '0');
    }
    return x <= end ? x : -1;
}

#define WALK_TOP (s->v[s->n - 1])
#define WALK_UNDER return walk_refuse(w, 6, at, 0, 0)
#define WALK_PUSH(x)                                      \
    do {                                                  \
        if (walk_push(s, (x)) < 0) return WALK_NO_MEMORY; \
    } while (0)

#if defined(__GNUC__) || defined(__clang__)
#define WALK_INLINE static inline __attribute__((always_inline))
#elif defined(_MSC_VER)
#define WALK_INLINE static __forceinline
#else
#define WALK_INLINE static inline
#endif

/* At a frame's end (or the data's): the frame's rules (Python: what follows the `while at < limit` loop). */
static int walk_frame_end(Walk *w) {
    if (w->frame >= 0 && w->at > w->limit) return walk_refuse(w, 11, w->frame, w->limit, w->at);
    if (w->at >= w->end) return walk_refuse(w, 10, w->end, 0, 0);
    w->frame = -1;
    w->limit = w->end;
    return WALK_OK;
}

/* The opcode at w->at, of a variable argument (STOP, LONG_BINPUT, FRAME, a declared length, lines): w->at moved
 * past it. */
static int walk_variable(Walk *w, int op, int kind) {
    const unsigned char *d = w->d;
    Py_ssize_t end = w->end, at = w->at + 1;
    WalkVec *s = &w->stack;
    if (kind == 1) { /* STOP */
        w->at = at;
        return WALK_DONE;
    }
    if (kind == 2) { /* LONG_BINPUT */
        uint64_t index = walk_read_le(d, at, 4, end, NULL);
        if (index > (uint64_t)end) return walk_refuse(w, 2, at - 1, 0, 0);
        if (s->n && walk_memo_set(&w->memo, index, WALK_TOP) < 0) return WALK_NO_MEMORY;
        at += 4;
    } else if (kind == 9) { /* FRAME: the opcodes of its length follow, and it ends where one ends */
        at += 8;
        if (at <= w->limit) { /* else its length crosses the frame it is in (or the data's end): the next step */
            if (w->frame >= 0 && at != w->limit) return walk_refuse(w, 12, at - 9, w->limit, 0);
            uint64_t length = walk_read_le(d, at - 8, 8, end, NULL);
            if (length > (uint64_t)(end - at)) {
                walk_refuse(w, 3, at - 9, (int64_t)length, end - at);
                w->out->a_unsigned = 1;
                return WALK_REFUSED;
            }
            w->frame = at - 9;
            w->limit = at + (Py_ssize_t)length;
        }
    } else if (kind >= 5) { /* a declared length, then that many bytes */
        int width = kind == 5 ? 1 : kind == 8 ? 8 : 4, got;
        uint64_t raw = walk_read_le(d, at, width, end, &got);
        int64_t length;
        if (kind == 6 && got > 0 && got < 8 && (raw >> (8 * got - 1)) & 1) /* signed: extend from its bytes */
            length = (int64_t)(raw | (~(uint64_t)0 << (8 * got)));
        else
            length = (int64_t)raw;
        int huge = kind == 8 && (raw >> 63); /* an unsigned length past int64 */
        Py_ssize_t left = end - at - width;  /* bytes after the length field */
        if (at + width > end || huge || length < 0 || (uint64_t)length > (uint64_t)left) {
            walk_refuse(w, 3, at - 1, (int64_t)raw, left > 0 ? left : 0);
            if (kind != 8) w->out->a = length;
            w->out->a_unsigned = kind == 8;
            return WALK_REFUSED;
        }
        WALK_PUSH(256);
        at += width + (Py_ssize_t)length;
    } else { /* one line, or two */
        Py_ssize_t line = at;
        for (int i = 0; i < (kind == 4 ? 2 : 1); i++) {
            const unsigned char *newline = at < end ? memchr(d + at, '\n', (size_t)(end - at)) : NULL;
            if (newline == NULL) return walk_refuse(w, 4, at, 0, 0);
            at = newline - d + 1;
        }
        if (op == 'p' || op == 'g') {
            int64_t index = walk_memo_index(d, line, at - 1, end);
            if (index < 0) return walk_refuse(w, 5, line - 1, 0, 0);
            if (op == 'g')
                WALK_PUSH(walk_memo_get(&w->memo, (uint64_t)index));
            else if (s->n && walk_memo_set(&w->memo, (uint64_t)index, WALK_TOP) < 0)
                return WALK_NO_MEMORY;
        } else {
            int r = walk_effect(w, op, line - 1);
            if (r != WALK_OK) return r;
        }
    }
    w->at = at;
    return WALK_OK;
}

/* One step of the walk: at a frame's end, the frame's rules; then the opcode at w->at, w->at moved past it. WALK_OK:
 * go on; WALK_DONE: the opcode was STOP. Inlined where it is called (once per user: check_pickle's loop, the C
 * reader's loop before its own switch); the rare opcodes of a variable argument and the frame ends are calls. */
WALK_INLINE int walk_step(Walk *w) {
    if (w->at >= w->limit) {
        int r = walk_frame_end(w);
        if (r != WALK_OK) return r;
    }
    const unsigned char *d = w->d;
    Py_ssize_t end = w->end, at = w->at;
    WalkVec *s = &w->stack, *m = &w->marks;
    int op = d[at];
    const unsigned char *t = w->table + 8 * op;
    if (t[0] < 2) return t[0] == 0 ? walk_refuse(w, 1, at, op, 0) : walk_variable(w, op, t[2]);
    int n = t[0] - 2, r;
    switch (t[1]) {
        case 0: /* pushes one item that hashes in one step */
            WALK_PUSH(256);
            break;
        case 2: /* MEMOIZE */
            if (!s->n) WALK_UNDER;
            if (walk_memo_set(&w->memo, (uint64_t)w->memo.filled, WALK_TOP) < 0) return WALK_NO_MEMORY;
            break;
        case 3: /* BINGET, LONG_BINGET */
            WALK_PUSH(walk_memo_get(&w->memo, walk_read_le(d, at + 1, n, end, NULL)));
            break;
        case 1: /* takes one, leaves one such item */
            if (!s->n) WALK_UNDER;
            WALK_TOP = 256;
            break;
        case 5: /* MARK */
            if (walk_push(m, s->n) < 0) return WALK_NO_MEMORY;
            break;
        case 11: /* REDUCE, NEWOBJ: the result may be a tuple of the arguments */
            if (s->n < 2) WALK_UNDER;
            w->budget -= s->v[--s->n] >> 8;
            WALK_TOP = s->v[s->n];
            if (w->budget < 0) return walk_refuse(w, 7, at, 0, 0);
            break;
        case 12: /* BUILD: the object stays what it was */
            if (s->n < 2) WALK_UNDER;
            w->budget -= s->v[--s->n] >> 8;
            if (w->budget < 0) return walk_refuse(w, 7, at, 0, 0);
            break;
        case 13: { /* SETITEMS: the keys, summed as items then shifted, as in Python */
            if (!m->n) WALK_UNDER;
            int64_t mark = m->v[--m->n], sum = 0, most = (w->budget + 1) << 8;
            int over = 0;
            for (Py_ssize_t i = (Py_ssize_t)mark; i < s->n && !over; i += 2) {
                sum += s->v[i];
                over = sum >= most;
            }
            if (mark < s->n) s->n = (Py_ssize_t)mark;
            if (over) return walk_refuse(w, 7, at, 0, 0);
            w->budget -= sum >> 8;
            break;
        }
        case 14: { /* APPENDS */
            if (!m->n) WALK_UNDER;
            int64_t mark = m->v[--m->n];
            if (mark < s->n) s->n = (Py_ssize_t)mark;
            break;
        }
        case 8: /* EMPTY_TUPLE */
            WALK_PUSH(257);
            break;
        case 9: /* TUPLE1 */
            if (!s->n) WALK_UNDER;
            if ((r = walk_new_tuple(w, WALK_TOP + 257, at)) != WALK_OK) return r;
            WALK_TOP += 257;
            break;
        case 10: { /* TUPLE2 */
            if (s->n < 2) WALK_UNDER;
            int64_t second = s->v[--s->n], first = WALK_TOP;
            int64_t shallower = (first & 255) < (second & 255) ? first & 255 : second & 255;
            int64_t item = first + second - shallower + 257;
            if ((r = walk_new_tuple(w, item, at)) != WALK_OK) return r;
            WALK_TOP = item;
            break;
        }
        case 4: /* BINPUT */
            if (at + 1 >= end || !s->n) WALK_UNDER;
            if (walk_memo_set(&w->memo, d[at + 1], WALK_TOP) < 0) return WALK_NO_MEMORY;
            break;
        case 7: /* nothing on the stack */
            break;
        default:
            if ((r = walk_effect(w, op, at)) != WALK_OK) return r;
    }
    w->at = at + 1 + n;
    return WALK_OK;
}

#undef WALK_TOP
#undef WALK_UNDER
#undef WALK_PUSH

/* a refusal as Python gets it: (code, byte, value, value), as torch_save._message words it */
static PyObject *walk_refusal_tuple(const WalkRefusal *out) {
    PyObject *a = out->a_unsigned ? PyLong_FromUnsignedLongLong((unsigned long long)out->a)
                                  : PyLong_FromLongLong(out->a);
    if (a == NULL) return NULL;
    return Py_BuildValue("(LLNL)", (long long)out->code, (long long)out->at, a, (long long)out->b);
}
#endif
