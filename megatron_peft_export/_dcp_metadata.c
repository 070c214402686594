/* A torch_dist `.metadata` read in C: the whole pickle interpreted, opcode by opcode, as Python's unpickler with
 * offline/dcp_metadata.py's find_class reads it (the memo, BUILD and SETITEMS changing objects made before, the
 * cached save plans included), into a compact graph (values are 32-bit words: small ints, and numbers of strings
 * (offsets into the data), large ints, tuples (in one pool), records, lists and dicts), never a Python object per
 * record; every object of the file is memoized, so the memo, the pools and the stack are most of its memory.
 * Then only what CheckpointMetadata holds is taken from the graph (keys, kinds, sizes, dtypes, chunks, stored
 * items, as arrays), the graph is freed, and Python gets the arrays.
 *
 * It reads a strict subset of what the Python path reads: anything it does not know (an opcode, a global, a dict
 * key other than a string or a record, a state it does not model, a field, a check that fails, invalid UTF-8, a
 * length past its limits) declines, and then the Python path (dcp_metadata._unpickle and the checks) runs and
 * accepts or refuses as it always did. What it accepts, every check the Python path makes when parsing or when a
 * key is first read has passed. The facts (allowed globals and what each is, record classes and their fields, the
 * limits) are given by Python (dcp_metadata._reader_tables), as _pickle_walk.c takes its tables from Python.
 * check_pickle runs first (the lengths, the hashing bound); every read here is bounds-checked again all the same.
 * The GIL is released while interpreting. read(data, tables) -> the arrays, or a str: why it declined. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef uint32_t V;
enum {
    T_ABSENT, T_NONE, T_TRUE, T_FALSE, T_INT, T_BIG, T_OPAQUE, T_STR, T_TUPLE, T_SIZE, T_LIST, T_DICT, T_RECORD,
    T_DROPPED, T_GLOBAL
};
/* a value: a 4-bit tag and a 28-bit payload: an int itself (T_INT, two's complement) or the number of what it is in
 * its table (T_BIG: an int of `bigs`; T_STR: a string of `strs`; T_TUPLE and T_SIZE: where the tuple is in `tuples`,
 * its length then its items; T_RECORD, T_DICT, T_LIST: its number). 0 is no value (ABSENT). */
#define TAG(v) ((int)((v)&15))
#define PAY(v) ((v) >> 4)
#define MK(t, p) ((V)(((V)(p)) << 4) | (V)(t))
#define ABSENT ((V)0)
#define MAX_PAYLOAD ((1u << 28) - 1) /* the most objects of a table, the longest tuple pool */
#define SMALL_INT ((int64_t)1 << 27) /* ints in [-SMALL_INT, SMALL_INT) are T_INT, others T_BIG */
#define MAX_SPAN_LEN 0xffffffu /* the longest string, tuple, dict or list */
#define MAX_START 0xffffffffu
#define INT_LIMIT ((int64_t)1 << 59) /* ints held are in [-INT_LIMIT, INT_LIMIT) */

/* what a global is, the record classes read, how a record takes its state: numbered as dcp_metadata.py's
 * _GLOBAL_KINDS, _READ_KINDS and _BEHAVIOURS */
enum { G_RECORD, G_DROPPED, G_SIZE, G_DTYPE, G_OPAQUE, G_GET_LAYOUT, G_OTHER };
enum { K_METADATA, K_TENSOR, K_BYTES, K_CHUNK, K_PROPERTIES, K_INDEX, K_INFO, K_COUNT_READ };
enum { B_PLAIN, B_STATE, B_CALLED };
#define MAX_KINDS 16
#define MAX_FIELDS 8
#define DICT_LENT 0x80000000u
#define DICT_PRIVATE 0x40000000u
#define DICT_FLAGS (DICT_LENT | DICT_PRIVATE)
#define SMALL_DICT 8

typedef struct {
    const char *module, *name;
    Py_ssize_t module_len, name_len;
    int kind, arg;
} Global;

typedef struct {
    const char *s;
    Py_ssize_t n;
} Name;

typedef struct {
    Global *globals;
    Py_ssize_t n_globals;
    int n_kinds, behaviour[MAX_KINDS], n_fields[MAX_KINDS];
    Name fields[MAX_KINDS][MAX_FIELDS];
    Name *layouts;
    Py_ssize_t n_layouts;
    int64_t max_dims, max_extent, max_chunks, highest_protocol, properties_len, properties_dtype;
    int64_t values_per_byte, values_base; /* the output's bound: dcp_metadata.C_READER_VALUES */
    int64_t max_objects; /* of each table: dcp_metadata.C_READER_OBJECTS, at most MAX_PAYLOAD */
    PyObject *dtypes;    /* the dtypes by number (G_DTYPE's arg) */
} Tables;

typedef struct {
    uint32_t start, len, cap, hash; /* cap's high bits: DICT_FLAGS; hash: 1 + index of its hash index, or 0 */
} Seq;

/* a hash table's slot: 0 empty, else the low 32 bits of the key's hash and 1 + the key's position (a probe compares
 * keys only where the hashes agree: keys are where the data is, rarely in cache) */
typedef uint64_t Slot;
#define SLOT(h, position) (((uint64_t)(uint32_t)(h) << 32) | ((uint64_t)(position) + 1))
#define SLOT_AT(slot) ((uint32_t)(slot)-1)
#define SLOT_HASH(slot) ((uint32_t)((slot) >> 32))

typedef struct {
    Slot *slots;
    uint32_t cap;
} Index;

typedef struct {
    V *v;
    size_t n, cap;
} Vals;

typedef struct { /* a string read: where its bytes are; their hash once asked (0: not yet) */
    uint32_t start, len;
    uint64_t hash;
} Str;

/* a string longer than SHORT_STR, hashed once when read: its hash, and the start of the first string read of the same
 * bytes (equal strings: equal `canon`) */
typedef struct {
    uint32_t start, len, canon;
    uint64_t hash;
} Long;

typedef struct {
    const unsigned char *d;
    size_t end;
    const Tables *t;
    const char *why; /* the reason it declined */
    Vals stack, tuples, dict_pool, list_pool, records, memo;
    unsigned char *kinds; /* each record's kind */
    size_t cap_kinds;
    Str *strs;
    size_t n_strs, cap_strs;
    int64_t *bigs;
    size_t n_bigs, cap_bigs;
    size_t *marks, n_marks, cap_marks;
    Seq *dicts, *lists;
    size_t n_dicts, cap_dicts, n_lists, cap_lists;
    Index *indexes;
    size_t n_indexes, cap_indexes;
    size_t memo_len; /* distinct memo indices stored: where MEMOIZE stores, as CPython's unpickler */
    int proto;
    uint64_t seed;
    V root;
    V field_strs[MAX_KINDS][MAX_FIELDS]; /* per record kind, a string last found to be each field's name */
    Long *longs; /* the strings longer than SHORT_STR, as read */
    size_t n_longs, cap_longs;
    uint32_t *by_start, *by_hash; /* 1 + a Long's number, 0 empty: by its start; by its hash, the first of its bytes */
    size_t cap_slots;
} R;

static int decline(R *r, const char *why) {
    r->why = why;
    return -1;
}
#define DECLINE(r, reason) decline((r), (reason))

static int grow(void **p, size_t *cap, size_t need, size_t elem) {
    if (need <= *cap) return 0;
    size_t c = *cap ? *cap : 64;
    while (c < need) {
        if (c > ((size_t)1 << 40)) return -1;
        c *= 2;
    }
    void *q = realloc(*p, c * elem);
    if (q == NULL) return -1;
    *p = q;
    *cap = c;
    return 0;
}

static int vals_more(R *r, Vals *s) {
    return grow((void **)&s->v, &s->cap, s->n + 1, sizeof(V)) < 0 ? DECLINE(r, "out of memory") : 0;
}

static inline int vals_push(R *r, Vals *s, V x) {
    if (s->n == s->cap && vals_more(r, s) < 0) return -1;
    s->v[s->n++] = x;
    return 0;
}

/* ------------------------------------------------------------------------------------------------------- strings */
/* strict UTF-8 (no surrogates, no overlong forms, at most U+10FFFF): what PyUnicode_DecodeUTF8 reads the same */
static int utf8_ok(const unsigned char *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        unsigned char c = s[i];
        if (c < 0x80) {
            i++;
            for (uint64_t w; i + 8 <= n; i += 8) { /* ASCII 8 bytes at a time, as keys mostly are */
                memcpy(&w, s + i, 8);
                if (w & 0x8080808080808080ULL) break;
            }
            continue;
        }
        size_t k;
        uint32_t cp;
        if (c >= 0xc2 && c <= 0xdf) {
            k = 1;
            cp = c & 0x1f;
        } else if (c >= 0xe0 && c <= 0xef) {
            k = 2;
            cp = c & 0x0f;
        } else if (c >= 0xf0 && c <= 0xf4) {
            k = 3;
            cp = c & 0x07;
        } else
            return 0;
        if (n - i <= k) return 0;
        for (size_t j = 1; j <= k; j++) {
            if ((s[i + j] & 0xc0) != 0x80) return 0;
            cp = cp << 6 | (s[i + j] & 0x3f);
        }
        if ((k == 2 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) || (k == 3 && (cp < 0x10000 || cp > 0x10ffff)))
            return 0;
        i += k + 1;
    }
    return 1;
}

static const unsigned char *str_bytes(const R *r, V v) { return r->d + r->strs[PAY(v)].start; }

static size_t str_len(const R *r, V v) { return r->strs[PAY(v)].len; }

/* Strings are hashed and compared where used as keys (dict_set, extract's and result's maps): one long string
 * memoized and used as a key many times (a 2-byte memo reference each) must not cost its length each time, or a 1 MB
 * file takes seconds (Python caches a str's hash). So a string longer than SHORT_STR is hashed once, when its opcode
 * is read (its bytes are in the file once per opcode), and given the start of the first string of the same bytes:
 * equal long strings are equal `canon`s. A shorter one costs at most SHORT_STR bytes per use: linear in the file.
 * Either's hash is kept once asked (str_hash). */
#define SHORT_STR 128

static const Long *long_of(const R *r, V s);

static int str_eq(const R *r, V a, V b) {
    if (a == b) return 1;
    size_t n = str_len(r, a);
    if (n != str_len(r, b)) return 0;
    if (n <= SHORT_STR) return memcmp(str_bytes(r, a), str_bytes(r, b), n) == 0;
    return long_of(r, a)->canon == long_of(r, b)->canon;
}

static int str_is(const R *r, V v, const Name *name) {
    return (Py_ssize_t)str_len(r, v) == name->n && memcmp(str_bytes(r, v), name->s, (size_t)name->n) == 0;
}

static uint64_t mix(uint64_t h) {
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ULL;
    h ^= h >> 33;
    return h;
}

static uint64_t hash_bytes(uint64_t seed, const unsigned char *s, size_t n) {
    uint64_t h = seed ^ (n * 0x9e3779b97f4a7c15ULL);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, s + i, 8);
        h = mix(h ^ w) + 0x9e3779b97f4a7c15ULL;
    }
    uint64_t w = 0;
    for (size_t j = 0; i + j < n; j++) w |= (uint64_t)s[i + j] << (8 * j);
    return mix(h ^ w ^ 0x5bd1e995);
}


static const Long *long_of(const R *r, V s) { /* a string longer than SHORT_STR: always there */
    uint32_t start = r->strs[PAY(s)].start;
    size_t mask = r->cap_slots - 1, j = (size_t)mix(start) & mask;
    while (r->longs[r->by_start[j] - 1].start != start) j = (j + 1) & mask;
    return &r->longs[r->by_start[j] - 1];
}

static void long_index(R *r, uint32_t number, int by_hash) {
    const Long *l = &r->longs[number];
    size_t mask = r->cap_slots - 1;
    uint32_t *slots = by_hash ? r->by_hash : r->by_start;
    size_t j = (size_t)(by_hash ? l->hash : mix(l->start)) & mask;
    while (slots[j]) j = (j + 1) & mask;
    slots[j] = number + 1;
}

static int long_add(R *r, size_t start, size_t n) { /* the string of n bytes at `start`, just read */
    if ((r->n_longs + 1) * 2 > r->cap_slots) {
        size_t cap = r->cap_slots ? r->cap_slots * 2 : 1024;
        uint32_t *by_start = calloc(cap, sizeof(uint32_t)), *by_hash = calloc(cap, sizeof(uint32_t));
        if (by_start == NULL || by_hash == NULL) {
            free(by_start);
            free(by_hash);
            return DECLINE(r, "out of memory");
        }
        free(r->by_start);
        free(r->by_hash);
        r->by_start = by_start;
        r->by_hash = by_hash;
        r->cap_slots = cap;
        for (size_t i = 0; i < r->n_longs; i++) {
            long_index(r, (uint32_t)i, 0);
            if (r->longs[i].canon == r->longs[i].start) long_index(r, (uint32_t)i, 1);
        }
    }
    if (r->n_longs == r->cap_longs && grow((void **)&r->longs, &r->cap_longs, r->n_longs + 1, sizeof(Long)) < 0)
        return DECLINE(r, "out of memory");
    Long *l = &r->longs[r->n_longs];
    l->start = l->canon = (uint32_t)start;
    l->len = (uint32_t)n;
    l->hash = hash_bytes(r->seed, r->d + start, n);
    size_t mask = r->cap_slots - 1, j = (size_t)l->hash & mask;
    for (; r->by_hash[j]; j = (j + 1) & mask) {
        const Long *o = &r->longs[r->by_hash[j] - 1];
        if (o->hash == l->hash && o->len == l->len && memcmp(r->d + o->start, r->d + start, n) == 0) {
            l->canon = o->start;
            break;
        }
    }
    if (l->canon == l->start) r->by_hash[j] = (uint32_t)r->n_longs + 1;
    long_index(r, (uint32_t)r->n_longs++, 0);
    return 0;
}

/* a string's hash, kept once asked: a string read once and used as a key many times (a memo reference each) is
 * hashed once */
static uint64_t str_hash(const R *r, V s) {
    Str *e = &r->strs[PAY(s)];
    if (!e->hash) {
        uint64_t h = e->len <= SHORT_STR ? hash_bytes(r->seed, r->d + e->start, e->len) : long_of(r, s)->hash;
        e->hash = h ? h : 1; /* 0: not yet */
    }
    return e->hash;
}

/* the string of n bytes at `start`, just read, numbered */
static int str_new(R *r, size_t start, size_t n, V *out) {
    if (r->n_strs >= (size_t)r->t->max_objects) return DECLINE(r, "too many strings");
    if (n > SHORT_STR && long_add(r, start, n) < 0) return -1;
    if (r->n_strs == r->cap_strs && grow((void **)&r->strs, &r->cap_strs, r->n_strs + 1, sizeof(Str)) < 0)
        return DECLINE(r, "out of memory");
    r->strs[r->n_strs] = (Str){(uint32_t)start, (uint32_t)n, 0};
    *out = MK(T_STR, r->n_strs++);
    return 0;
}

/* a dict key: a string (by value) or a record (by identity), as the Python path's dicts compare them */
static uint64_t key_hash(const R *r, V k) { return TAG(k) == T_STR ? str_hash(r, k) : mix(k ^ r->seed); }

static int key_eq(const R *r, V a, V b) {
    if (TAG(a) != TAG(b)) return 0;
    return TAG(a) == T_STR ? str_eq(r, a, b) : a == b;
}

/* --------------------------------------------------------------------------------------------------------- dicts */
static Seq *seq_new(R *r, Seq **seqs, size_t *n, size_t *cap, uint32_t *id) {
    if (*n >= (size_t)r->t->max_objects || (*n == *cap && grow((void **)seqs, cap, *n + 1, sizeof(Seq)) < 0)) {
        DECLINE(r, "too many dicts and lists");
        return NULL;
    }
    Seq *s = &(*seqs)[*n];
    *id = (uint32_t)(*n)++;
    s->start = s->len = s->cap = s->hash = 0;
    return s;
}

/* room for `more` entries of `width` words at the end of a sequence of the pool: grown in place at the pool's end,
 * else moved to the pool's end; to exactly what is asked the first time (a dict filled by one SETITEMS), else to
 * twice its capacity or more */
static int seq_room(R *r, Vals *pool, Seq *s, size_t width, size_t more) {
    uint32_t cap = s->cap & ~DICT_FLAGS, flags = s->cap & DICT_FLAGS;
    if ((size_t)s->len + more <= cap) return 0;
    size_t ncap = cap ? (size_t)cap * 2 : 0;
    if (ncap < (size_t)s->len + more) ncap = (size_t)s->len + more;
    if (ncap > MAX_SPAN_LEN) return DECLINE(r, "a container too large");
    if (cap && s->start + (size_t)cap * width == pool->n) { /* at the pool's end: grown in place */
        if (grow((void **)&pool->v, &pool->cap, pool->n + (ncap - cap) * width, sizeof(V)) < 0)
            return DECLINE(r, "out of memory");
        pool->n += (ncap - cap) * width;
    } else {
        if (pool->n + ncap * width > MAX_START) return DECLINE(r, "a pool too large");
        if (grow((void **)&pool->v, &pool->cap, pool->n + ncap * width, sizeof(V)) < 0)
            return DECLINE(r, "out of memory");
        memcpy(pool->v + pool->n, pool->v + s->start, (size_t)s->len * width * sizeof(V));
        s->start = (uint32_t)pool->n;
        pool->n += ncap * width;
    }
    s->cap = (uint32_t)ncap | flags;
    return 0;
}

static void slot_put(Slot *slots, size_t cap, uint64_t h, uint32_t position) {
    size_t mask = cap - 1, i = (uint32_t)h & mask;
    while (slots[i]) i = (i + 1) & mask;
    slots[i] = SLOT(h, position);
}

/* a table's slots, rehashed into `cap` new ones by the hashes they hold */
static Slot *slots_grown(const Slot *old, size_t old_cap, size_t cap) {
    Slot *slots = calloc(cap, sizeof(Slot));
    if (slots != NULL)
        for (size_t i = 0; i < old_cap; i++)
            if (old[i]) slot_put(slots, cap, SLOT_HASH(old[i]), SLOT_AT(old[i]));
    return slots;
}

/* the dict's hash index, built or grown for its length (dicts of more than SMALL_DICT entries have one) */
static int index_fit(R *r, Seq *s) {
    Index *x;
    if (!s->hash) {
        if (r->n_indexes == r->cap_indexes &&
            grow((void **)&r->indexes, &r->cap_indexes, r->n_indexes + 1, sizeof(Index)) < 0)
            return DECLINE(r, "out of memory");
        x = &r->indexes[r->n_indexes];
        x->slots = NULL;
        x->cap = 0;
        s->hash = (uint32_t)++r->n_indexes;
    }
    x = &r->indexes[s->hash - 1];
    if ((uint64_t)s->len * 2 < x->cap) return 0;
    uint32_t cap = 64;
    while ((uint64_t)cap < (uint64_t)s->len * 4) cap *= 2;
    Slot *slots = slots_grown(x->slots, x->cap, cap); /* all but the entry just appended, when it grows */
    if (slots == NULL) return DECLINE(r, "out of memory");
    const V *e = r->dict_pool.v + s->start;
    for (uint32_t i = x->slots ? s->len - 1 : 0; i < s->len; i++) slot_put(slots, cap, key_hash(r, e[2 * i]), i);
    free(x->slots);
    x->slots = slots;
    x->cap = cap;
    return 0;
}

/* dict[key] = value, as PyObject_SetItem on a dict: an equal key's value replaced where it is, else appended */
static int dict_set(R *r, uint32_t id, V key, V value) {
    if (TAG(key) != T_STR && TAG(key) != T_RECORD) return DECLINE(r, "a dict key other than a string or a record");
    Seq *s = &r->dicts[id];
    V *e = r->dict_pool.v + s->start;
    uint64_t h = 0;
    if (s->hash) {
        Index *x = &r->indexes[s->hash - 1];
        h = key_hash(r, key);
        uint32_t mask = x->cap - 1, i = (uint32_t)h & mask;
        for (; x->slots[i]; i = (i + 1) & mask)
            if (SLOT_HASH(x->slots[i]) == (uint32_t)h && key_eq(r, e[2 * SLOT_AT(x->slots[i])], key)) {
                e[2 * SLOT_AT(x->slots[i]) + 1] = value;
                return 0;
            }
    } else {
        for (uint32_t i = 0; i < s->len; i++)
            if (key_eq(r, e[2 * i], key)) {
                e[2 * i + 1] = value;
                return 0;
            }
    }
    if (seq_room(r, &r->dict_pool, s, 2, 1) < 0) return -1;
    e = r->dict_pool.v + s->start;
    e[2 * s->len] = key;
    e[2 * s->len + 1] = value;
    s->len++;
    if (s->len > SMALL_DICT) {
        if (s->hash && (uint64_t)s->len * 2 < r->indexes[s->hash - 1].cap) {
            slot_put(r->indexes[s->hash - 1].slots, r->indexes[s->hash - 1].cap, h, s->len - 1);
            return 0;
        }
        return index_fit(r, s);
    }
    return 0;
}

static int dict_new(R *r, V *out) {
    uint32_t id;
    if (seq_new(r, &r->dicts, &r->n_dicts, &r->cap_dicts, &id) == NULL) return -1;
    *out = MK(T_DICT, id);
    return 0;
}

/* --------------------------------------------------------------------------------------------------------- stack */
static size_t fence(const R *r) { return r->n_marks ? r->marks[r->n_marks - 1] : 0; }

/* marker(): the last mark, taken */
static int marker(R *r, size_t *mark) {
    if (!r->n_marks) return DECLINE(r, "no mark");
    *mark = r->marks[--r->n_marks];
    if (*mark > r->stack.n || *mark < fence(r)) return DECLINE(r, "a mark below the fence");
    return 0;
}

static int pop(R *r, V *out) {
    if (r->stack.n <= fence(r)) return DECLINE(r, "stack underflow");
    *out = r->stack.v[--r->stack.n];
    return 0;
}

/* the stack's items from `from` popped into a tuple: its length then its items at the tuple pool's end (the empty
 * tuple: the pool's first word, 0) */
static int tuple_from(R *r, size_t from, V *out) {
    size_t n = r->stack.n - from;
    if (n == 0) {
        *out = MK(T_TUPLE, 0);
        return 0;
    }
    if (n > MAX_SPAN_LEN) return DECLINE(r, "a tuple too large");
    if (r->tuples.n + 1 + n > (size_t)r->t->max_objects) return DECLINE(r, "too many tuple items");
    if (grow((void **)&r->tuples.v, &r->tuples.cap, r->tuples.n + 1 + n, sizeof(V)) < 0)
        return DECLINE(r, "out of memory");
    r->tuples.v[r->tuples.n] = (V)n;
    memcpy(r->tuples.v + r->tuples.n + 1, r->stack.v + from, n * sizeof(V));
    *out = MK(T_TUPLE, r->tuples.n);
    r->tuples.n += 1 + n;
    r->stack.n = from;
    return 0;
}

static const V *items_of(const R *r, V tuple) { return r->tuples.v + PAY(tuple) + 1; }

static size_t tuple_len(const R *r, V tuple) { return r->tuples.v[PAY(tuple)]; }

/* ints: T_INT holds the small ones, `bigs` the others */
static int is_int(V v) { return TAG(v) == T_INT || TAG(v) == T_BIG; }

static int64_t int_of(const R *r, V v) {
    return TAG(v) == T_INT ? (int64_t)(int32_t)v >> 4 : r->bigs[PAY(v)];
}

static int int_new(R *r, int64_t x, V *out) {
    if (x >= -SMALL_INT && x < SMALL_INT) {
        *out = MK(T_INT, (V)x & MAX_PAYLOAD);
        return 0;
    }
    if (r->n_bigs >= (size_t)r->t->max_objects) return DECLINE(r, "too many large ints");
    if (r->n_bigs == r->cap_bigs && grow((void **)&r->bigs, &r->cap_bigs, r->n_bigs + 1, sizeof(int64_t)) < 0)
        return DECLINE(r, "out of memory");
    r->bigs[r->n_bigs] = x;
    *out = MK(T_BIG, r->n_bigs++);
    return 0;
}

/* ------------------------------------------------------------------------------------------------- the opcodes */
static int memo_put(R *r, uint64_t index) {
    if (r->stack.n <= fence(r)) return DECLINE(r, "stack underflow");
    if (index > r->end || index > r->memo_len + 65536) return DECLINE(r, "a memo index far past those stored");
    if (index >= r->memo.cap) {
        size_t old = r->memo.cap;
        if (grow((void **)&r->memo.v, &r->memo.cap, (size_t)index + 1, sizeof(V)) < 0)
            return DECLINE(r, "out of memory");
        memset(r->memo.v + old, 0, (r->memo.cap - old) * sizeof(V)); /* ABSENT */
    }
    if (r->memo.v[index] == ABSENT) r->memo_len++;
    r->memo.v[index] = r->stack.v[r->stack.n - 1];
    return 0;
}

static int memo_get(R *r, uint64_t index) {
    if (index >= r->memo.cap || r->memo.v[index] == ABSENT) return DECLINE(r, "a memo index not stored");
    return vals_push(r, &r->stack, r->memo.v[index]);
}

static uint64_t le(const unsigned char *p, int n) {
    uint64_t x = 0;
    for (int i = 0; i < n; i++) x |= (uint64_t)p[i] << (8 * i);
    return x;
}

static const Global *find_global(const R *r, const unsigned char *m, size_t mn, const unsigned char *n, size_t nn) {
    for (Py_ssize_t i = 0; i < r->t->n_globals; i++) {
        const Global *g = &r->t->globals[i];
        if ((size_t)g->module_len == mn && (size_t)g->name_len == nn && memcmp(g->module, m, mn) == 0 &&
            memcmp(g->name, n, nn) == 0)
            return g;
    }
    return NULL;
}

static int push_global(R *r, const unsigned char *m, size_t mn, const unsigned char *n, size_t nn) {
    const Global *g = find_global(r, m, mn, n, nn);
    if (g == NULL) return DECLINE(r, "a global not allowed");
    return vals_push(r, &r->stack, MK(T_GLOBAL, g - r->t->globals));
}

static int new_record(R *r, int kind, V *out) {
    if (r->records.n >= (size_t)r->t->max_objects) return DECLINE(r, "too many records");
    if (vals_push(r, &r->records, ABSENT) < 0) return -1;
    if (grow((void **)&r->kinds, &r->cap_kinds, r->records.n, 1) < 0) return DECLINE(r, "out of memory");
    r->kinds[r->records.n - 1] = (unsigned char)kind;
    *out = MK(T_RECORD, r->records.n - 1);
    return 0;
}

#define REC_INDEX(v) PAY(v)
#define REC_KIND(r, v) ((int)(r)->kinds[PAY(v)])

/* NEWOBJ (cls.__new__(cls, *args)) and REDUCE (callable(*args)) on what find_class gives */
static int call(R *r, V callable, V args, int newobj, V *out) {
    if (TAG(args) != T_TUPLE) return DECLINE(r, "arguments not a tuple");
    if (TAG(callable) != T_GLOBAL) return DECLINE(r, "a call of something not a global");
    const Global *g = &r->t->globals[PAY(callable)];
    size_t n = tuple_len(r, args);
    switch (g->kind) {
        case G_RECORD: {
            int behaviour = r->t->behaviour[g->arg];
            if (behaviour != B_CALLED && n) return DECLINE(r, "a record class given arguments");
            return new_record(r, g->arg, out);
        }
        case G_DROPPED:
            *out = MK(T_DROPPED, 0);
            return 0;
        case G_SIZE: {
            if (newobj || n != 1) return DECLINE(r, "torch.Size not of one tuple");
            V t = items_of(r, args)[0];
            if (TAG(t) != T_TUPLE) return DECLINE(r, "torch.Size not of a tuple");
            const V *x = items_of(r, t);
            for (size_t i = 0; i < tuple_len(r, t); i++)
                if (!is_int(x[i]) || int_of(r, x[i]) < 0) return DECLINE(r, "torch.Size not of non-negative ints");
            *out = MK(T_SIZE, PAY(t)); /* the same items */
            return 0;
        }
        case G_GET_LAYOUT: {
            if (newobj || n != 1) return DECLINE(r, "_get_layout not of one argument");
            V name = items_of(r, args)[0];
            if (TAG(name) == T_STR)
                for (Py_ssize_t i = 0; i < r->t->n_layouts; i++)
                    if (str_is(r, name, &r->t->layouts[i])) {
                        *out = MK(T_OPAQUE, 0);
                        return 0;
                    }
            return DECLINE(r, "_get_layout of an unknown layout");
        }
        default:
            return DECLINE(r, "a call it does not model");
    }
}

/* BUILD: as CPython's load_build on what the Python path's unpickler builds */
static int build(R *r, V obj, V state) {
    if (TAG(obj) == T_DROPPED) return 0; /* Dropped.__setstate__ keeps nothing */
    if (TAG(obj) != T_RECORD) return DECLINE(r, "BUILD on something not a record");
    int behaviour = r->t->behaviour[REC_KIND(r, obj)];
    V *slot = &r->records.v[REC_INDEX(obj)];
    if (behaviour == B_STATE) { /* __setstate__: the state kept as it is */
        *slot = state;
        return 0;
    }
    if (TAG(state) == T_NONE) return 0;
    if (TAG(state) != T_DICT) return DECLINE(r, "a state not a dict");
    if (behaviour == B_CALLED) return 0; /* its fields are never read (a record of it is declined where read) */
    uint32_t from = (uint32_t)PAY(state);
    if (*slot == ABSENT) { /* the record's __dict__: the state's entries, shared until either would change */
        r->dicts[from].cap |= DICT_LENT;
        *slot = state;
        return 0;
    }
    uint32_t to = (uint32_t)PAY(*slot);
    if (!(r->dicts[to].cap & DICT_PRIVATE)) { /* shared: the record's own copy first */
        V copy;
        if (dict_new(r, &copy) < 0) return -1;
        uint32_t id = (uint32_t)PAY(copy);
        r->dicts[id].cap |= DICT_PRIVATE;
        for (uint32_t i = 0; i < r->dicts[to].len; i++) {
            const V *e = r->dict_pool.v + r->dicts[to].start + 2 * i;
            if (dict_set(r, id, e[0], e[1]) < 0) return -1;
        }
        *slot = copy;
        to = id;
    }
    for (uint32_t i = 0; i < r->dicts[from].len; i++) {
        V k = r->dict_pool.v[r->dicts[from].start + 2 * i], v = r->dict_pool.v[r->dicts[from].start + 2 * i + 1];
        if (dict_set(r, to, k, v) < 0) return -1;
    }
    return 0;
}

static int setitems(R *r, size_t x) { /* do_setitems: the pairs above x into the dict below it */
    size_t len = r->stack.n;
    if (x > len || x <= fence(r)) return DECLINE(r, "stack underflow");
    if (len == x) return 0;
    if ((len - x) % 2) return DECLINE(r, "odd number of items for SETITEMS");
    V target = r->stack.v[x - 1];
    if (TAG(target) != T_DICT) return DECLINE(r, "SETITEMS on something not a dict");
    uint32_t id = (uint32_t)PAY(target);
    if (r->dicts[id].cap & DICT_LENT) return DECLINE(r, "SETITEMS on a dict a BUILD read");
    if (seq_room(r, &r->dict_pool, &r->dicts[id], 2, (len - x) / 2) < 0) return -1;
    for (size_t i = x; i < len; i += 2)
        if (dict_set(r, id, r->stack.v[i], r->stack.v[i + 1]) < 0) return -1;
    r->stack.n = x;
    return 0;
}

static int appends(R *r, size_t x) { /* do_append */
    size_t len = r->stack.n;
    if (x > len || x <= fence(r)) return DECLINE(r, "stack underflow");
    if (len == x) return 0;
    V target = r->stack.v[x - 1];
    if (TAG(target) != T_LIST) return DECLINE(r, "APPENDS on something not a list");
    Seq *s = &r->lists[PAY(target)];
    for (size_t i = x; i < len; i++) {
        if (seq_room(r, &r->list_pool, s, 1, len - i) < 0) return -1;
        r->list_pool.v[s->start + s->len++] = r->stack.v[i];
    }
    r->stack.n = x;
    return 0;
}

enum {
    MARK = '(', STOP = '.', POP = '0', POP_MARK = '1', DUP = '2', BININT = 'J', BININT1 = 'K', BININT2 = 'M',
    NONE = 'N', REDUCE = 'R', BINUNICODE = 'X', APPEND = 'a', BUILD = 'b', GLOBAL = 'c', APPENDS = 'e', BINGET = 'h',
    LONG_BINGET = 'j', EMPTY_LIST = ']', BINPUT = 'q', LONG_BINPUT = 'r', SETITEM = 's', TUPLE = 't', SETITEMS = 'u',
    EMPTY_DICT = '}', EMPTY_TUPLE = ')', BINFLOAT = 'G', PROTO = 0x80, NEWOBJ = 0x81, TUPLE1 = 0x85, TUPLE2 = 0x86,
    TUPLE3 = 0x87, NEWTRUE = 0x88, NEWFALSE = 0x89, LONG1 = 0x8a, SHORT_BINUNICODE = 0x8c, BINUNICODE8 = 0x8d,
    STACK_GLOBAL = 0x93, MEMOIZE = 0x94, FRAME = 0x95
};

#define NEED(k) \
    if (end - at < (size_t)(k)) return DECLINE(r, "an opcode past the data")
#define TRY(x) \
    if ((x) < 0) return -1

static int run(R *r) {
    const unsigned char *d = r->d;
    size_t end = r->end, at = 0;
    V a, b, c;
    TRY(vals_push(r, &r->tuples, 0)); /* the empty tuple */
    while (at < end) {
        int op = d[at++];
        switch (op) {
            case PROTO:
                NEED(1);
                if (d[at] > r->t->highest_protocol) return DECLINE(r, "an unsupported protocol");
                r->proto = d[at++];
                break;
            case FRAME: {
                NEED(8);
                uint64_t n = le(d + at, 8);
                at += 8;
                if (n > end - at) return DECLINE(r, "a frame past the data");
                break;
            }
            case STOP:
                TRY(pop(r, &r->root));
                return 0;
            case MARK:
                if (r->n_marks == r->cap_marks &&
                    grow((void **)&r->marks, &r->cap_marks, r->n_marks + 1, sizeof(size_t)) < 0)
                    return DECLINE(r, "out of memory");
                r->marks[r->n_marks++] = r->stack.n;
                break;
            case POP:
                if (r->n_marks && r->marks[r->n_marks - 1] == r->stack.n)
                    r->n_marks--;
                else
                    TRY(pop(r, &a));
                break;
            case POP_MARK: {
                size_t mark;
                TRY(marker(r, &mark));
                r->stack.n = mark;
                break;
            }
            case DUP:
                if (r->stack.n <= fence(r)) return DECLINE(r, "stack underflow");
                TRY(vals_push(r, &r->stack, r->stack.v[r->stack.n - 1]));
                break;
            case NONE:
                TRY(vals_push(r, &r->stack, MK(T_NONE, 0)));
                break;
            case NEWTRUE:
                TRY(vals_push(r, &r->stack, MK(T_TRUE, 0)));
                break;
            case NEWFALSE:
                TRY(vals_push(r, &r->stack, MK(T_FALSE, 0)));
                break;
            case BININT:
                NEED(4);
                TRY(int_new(r, (int64_t)(int32_t)(uint32_t)le(d + at, 4), &a));
                TRY(vals_push(r, &r->stack, a));
                at += 4;
                break;
            case BININT1:
                NEED(1);
                TRY(vals_push(r, &r->stack, MK(T_INT, d[at])));
                at += 1;
                break;
            case BININT2:
                NEED(2);
                TRY(vals_push(r, &r->stack, MK(T_INT, le(d + at, 2))));
                at += 2;
                break;
            case LONG1: {
                NEED(1);
                int n = d[at++];
                if (n > 8) return DECLINE(r, "an int of more than 8 bytes");
                NEED(n);
                uint64_t x = le(d + at, n);
                if (n > 0 && n < 8 && (x >> (8 * n - 1)) & 1) x |= ~(uint64_t)0 << (8 * n);
                int64_t v = (int64_t)x;
                if (v < -INT_LIMIT || v >= INT_LIMIT) return DECLINE(r, "an int too large");
                at += (size_t)n;
                TRY(int_new(r, v, &a));
                TRY(vals_push(r, &r->stack, a));
                break;
            }
            case BINFLOAT:
                NEED(8);
                at += 8;
                TRY(vals_push(r, &r->stack, MK(T_OPAQUE, 0)));
                break;
            case SHORT_BINUNICODE:
            case BINUNICODE:
            case BINUNICODE8: {
                int width = op == SHORT_BINUNICODE ? 1 : op == BINUNICODE ? 4 : 8;
                NEED(width);
                uint64_t n = le(d + at, width);
                at += (size_t)width;
                if (n > end - at) return DECLINE(r, "a string past the data");
                if (n > MAX_SPAN_LEN || at > MAX_START) return DECLINE(r, "a string too large");
                if (!utf8_ok(d + at, (size_t)n)) return DECLINE(r, "a string not strict UTF-8");
                TRY(str_new(r, at, (size_t)n, &a));
                TRY(vals_push(r, &r->stack, a));
                at += (size_t)n;
                break;
            }
            case GLOBAL: {
                const unsigned char *m = d + at, *nl = memchr(m, '\n', end - at);
                if (nl == NULL) return DECLINE(r, "an unterminated line");
                const unsigned char *n = nl + 1, *nl2 = memchr(n, '\n', (size_t)(d + end - n));
                if (nl2 == NULL) return DECLINE(r, "an unterminated line");
                TRY(push_global(r, m, (size_t)(nl - m), n, (size_t)(nl2 - n)));
                at = (size_t)(nl2 + 1 - d);
                break;
            }
            case STACK_GLOBAL:
                TRY(pop(r, &b));
                TRY(pop(r, &a));
                if (TAG(a) != T_STR || TAG(b) != T_STR) return DECLINE(r, "STACK_GLOBAL not of strings");
                TRY(push_global(r, str_bytes(r, a), str_len(r, a), str_bytes(r, b), str_len(r, b)));
                break;
            case EMPTY_TUPLE:
                TRY(vals_push(r, &r->stack, MK(T_TUPLE, 0)));
                break;
            case TUPLE1:
            case TUPLE2:
            case TUPLE3: {
                size_t n = (size_t)(op - TUPLE1 + 1);
                if (r->stack.n < n || r->stack.n - n < fence(r)) return DECLINE(r, "stack underflow");
                TRY(tuple_from(r, r->stack.n - n, &a));
                TRY(vals_push(r, &r->stack, a));
                break;
            }
            case TUPLE: {
                size_t mark;
                TRY(marker(r, &mark));
                TRY(tuple_from(r, mark, &a));
                TRY(vals_push(r, &r->stack, a));
                break;
            }
            case EMPTY_LIST: {
                uint32_t id;
                if (seq_new(r, &r->lists, &r->n_lists, &r->cap_lists, &id) == NULL) return -1;
                TRY(vals_push(r, &r->stack, MK(T_LIST, id)));
                break;
            }
            case EMPTY_DICT:
                TRY(dict_new(r, &a));
                TRY(vals_push(r, &r->stack, a));
                break;
            case APPEND:
                TRY(appends(r, r->stack.n - (r->stack.n > 0)));
                break;
            case APPENDS: {
                size_t mark;
                TRY(marker(r, &mark));
                TRY(appends(r, mark));
                break;
            }
            case SETITEM:
                if (r->stack.n < 2) return DECLINE(r, "stack underflow");
                TRY(setitems(r, r->stack.n - 2));
                break;
            case SETITEMS: {
                size_t mark;
                TRY(marker(r, &mark));
                TRY(setitems(r, mark));
                break;
            }
            case MEMOIZE:
                TRY(memo_put(r, r->memo_len));
                break;
            case BINPUT:
                NEED(1);
                TRY(memo_put(r, d[at]));
                at += 1;
                break;
            case LONG_BINPUT:
                NEED(4);
                TRY(memo_put(r, le(d + at, 4)));
                at += 4;
                break;
            case BINGET:
                NEED(1);
                TRY(memo_get(r, d[at]));
                at += 1;
                break;
            case LONG_BINGET:
                NEED(4);
                TRY(memo_get(r, le(d + at, 4)));
                at += 4;
                break;
            case NEWOBJ:
            case REDUCE:
                TRY(pop(r, &b));
                TRY(pop(r, &a));
                TRY(call(r, a, b, op == NEWOBJ, &c));
                TRY(vals_push(r, &r->stack, c));
                break;
            case BUILD:
                TRY(pop(r, &b));
                if (r->stack.n <= fence(r)) return DECLINE(r, "stack underflow");
                TRY(build(r, r->stack.v[r->stack.n - 1], b));
                break;
            default:
                return DECLINE(r, "an opcode it does not read");
        }
    }
    return DECLINE(r, "no STOP");
}

/* --------------------------------------------------------------------------------- what CheckpointMetadata holds */
typedef struct {
    V key, size;
    int64_t dtype; /* -1: a BytesStorageMetadata */
    uint64_t chunk_start, chunk_count;
} Entry;

typedef struct {
    V fqn, path, offsets; /* offsets ABSENT: None */
    int64_t offset, length;
    uint32_t group, path_id;
} Item;

typedef struct {
    Entry *entries;
    size_t n_entries, cap_entries;
    int64_t *chunks;
    size_t n_chunks, cap_chunks; /* int64s */
    Item *items;
    size_t n_items, cap_items;
    V *groups, *paths; /* the first fqn of each group, each distinct path */
    size_t n_groups, cap_groups, n_paths, cap_paths;
    uint64_t values_left; /* chunk values and item offsets it may still make (dcp_metadata.C_READER_VALUES) */
} Out;

/* `n` more values in the output arrays, or declined: the output is bounded by the file's size (a chunk or offsets
 * tuple referenced many times is read once per reference, where the Python path converts a key's when it is read) */
static int spend(R *r, Out *o, uint64_t n) {
    if (n > o->values_left) return DECLINE(r, "more chunk and offset values than the file's size allows");
    o->values_left -= n;
    return 0;
}

/* a record's fields, each at its place in the kind's field list (ABSENT when not set); declined when its dict has a
 * key that is not one of them */
static int fields(R *r, V record, int kind, V *out) {
    if (TAG(record) != T_RECORD || REC_KIND(r, record) != kind) return DECLINE(r, "not the record expected");
    int n = r->t->n_fields[kind];
    for (int i = 0; i < n; i++) out[i] = ABSENT;
    V state = r->records.v[REC_INDEX(record)];
    if (state == ABSENT) return 0;
    const Seq *s = &r->dicts[PAY(state)];
    const V *e = r->dict_pool.v + s->start;
    for (uint32_t i = 0; i < s->len; i++) {
        int f = 0;
        if (TAG(e[2 * i]) != T_STR) return DECLINE(r, "a field name not a string");
        while (f < n && e[2 * i] != r->field_strs[kind][f]) f++; /* a string already found to be the name */
        if (f == n) {
            f = 0;
            while (f < n && !str_is(r, e[2 * i], &r->t->fields[kind][f])) f++;
            if (f == n) return DECLINE(r, "a field the record does not have");
            r->field_strs[kind][f] = e[2 * i];
        }
        out[f] = e[2 * i + 1];
    }
    return 0;
}

static int extent(const R *r, V v) { return is_int(v) && int_of(r, v) >= 0 && int_of(r, v) <= r->t->max_extent; }

static int size_ok(const R *r, V v) { /* _ints of a torch.Size (its items: non-negative ints) */
    if (TAG(v) != T_SIZE || (int64_t)tuple_len(r, v) > r->t->max_dims) return 0;
    const V *x = items_of(r, v);
    for (size_t i = 0; i < tuple_len(r, v); i++)
        if (!extent(r, x[i])) return 0;
    return 1;
}

static int push_i64(R *r, Out *o, int64_t x) {
    if (o->n_chunks == o->cap_chunks && grow((void **)&o->chunks, &o->cap_chunks, o->n_chunks + 1, 8) < 0)
        return DECLINE(r, "out of memory");
    o->chunks[o->n_chunks++] = x;
    return 0;
}

static int dtype_of(R *r, V properties, int64_t *dtype) {
    if (TAG(properties) != T_RECORD || REC_KIND(r, properties) != K_PROPERTIES) return DECLINE(r, "properties");
    V state = r->records.v[REC_INDEX(properties)], found = ABSENT;
    if (TAG(state) == T_TUPLE && (int64_t)tuple_len(r, state) == r->t->properties_len)
        found = items_of(r, state)[r->t->properties_dtype];
    else if (state != ABSENT && TAG(state) == T_DICT) {
        V f[MAX_FIELDS];
        const Seq *s = &r->dicts[PAY(state)];
        int n = r->t->n_fields[K_PROPERTIES];
        for (int i = 0; i < n; i++) f[i] = ABSENT;
        for (uint32_t i = 0; i < s->len; i++) {
            V k = r->dict_pool.v[s->start + 2 * i];
            int j = 0;
            if (TAG(k) != T_STR) return DECLINE(r, "properties");
            while (j < n && !str_is(r, k, &r->t->fields[K_PROPERTIES][j])) j++;
            if (j == n) return DECLINE(r, "properties");
            f[j] = r->dict_pool.v[s->start + 2 * i + 1];
        }
        found = f[r->t->properties_dtype];
    }
    if (found == ABSENT || TAG(found) != T_GLOBAL || r->t->globals[PAY(found)].kind != G_DTYPE)
        return DECLINE(r, "properties without a dtype");
    *dtype = r->t->globals[PAY(found)].arg;
    return 0;
}

static int tensor(R *r, Out *o, Entry *entry, V record) {
    V f[MAX_FIELDS]; /* properties, size, chunks */
    TRY(fields(r, record, K_TENSOR, f));
    if (f[0] == ABSENT || f[1] == ABSENT || f[2] == ABSENT) return DECLINE(r, "a tensor without all its fields");
    if (!size_ok(r, f[1])) return DECLINE(r, "a tensor's size");
    if (TAG(f[2]) != T_LIST) return DECLINE(r, "chunks not a list");
    const Seq *chunks = &r->lists[PAY(f[2])];
    if ((int64_t)chunks->len > r->t->max_chunks) return DECLINE(r, "too many chunks");
    TRY(dtype_of(r, f[0], &entry->dtype));
    entry->size = f[1];
    entry->chunk_start = o->n_chunks;
    entry->chunk_count = chunks->len;
    size_t ndim = tuple_len(r, f[1]);
    const V *size = items_of(r, f[1]);
    TRY(spend(r, o, (uint64_t)chunks->len * 2 * ndim));
    for (uint32_t i = 0; i < chunks->len; i++) {
        V c[MAX_FIELDS]; /* offsets, sizes */
        TRY(fields(r, r->list_pool.v[chunks->start + i], K_CHUNK, c));
        if (c[0] == ABSENT || c[1] == ABSENT || !size_ok(r, c[0]) || !size_ok(r, c[1])) return DECLINE(r, "a chunk");
        if (tuple_len(r, c[0]) != ndim || tuple_len(r, c[1]) != ndim) return DECLINE(r, "a chunk's dimensions");
        const V *offsets = items_of(r, c[0]), *sizes = items_of(r, c[1]);
        for (size_t j = 0; j < ndim; j++)
            if (int_of(r, offsets[j]) + int_of(r, sizes[j]) > int_of(r, size[j]))
                return DECLINE(r, "a chunk outside its tensor");
        for (size_t j = 0; j < ndim; j++) TRY(push_i64(r, o, int_of(r, offsets[j])));
        for (size_t j = 0; j < ndim; j++) TRY(push_i64(r, o, int_of(r, sizes[j])));
    }
    return 0;
}

/* a map of distinct strings (by value) to their number */
typedef struct {
    Slot *slots;
    size_t cap;
} StrMap;

static int strmap_find(R *r, StrMap *m, const V *names, size_t n, V s, uint32_t *found, V **grow_names,
                       size_t *cap_names) {
    if ((n + 1) * 2 > m->cap) {
        size_t cap = m->cap ? m->cap * 2 : 256;
        while (cap < (n + 1) * 2) cap *= 2;
        Slot *slots = slots_grown(m->slots, m->cap, cap);
        if (slots == NULL) return DECLINE(r, "out of memory");
        free(m->slots);
        m->slots = slots;
        m->cap = cap;
    }
    uint64_t h = str_hash(r, s);
    size_t j = (uint32_t)h & (m->cap - 1);
    for (; m->slots[j]; j = (j + 1) & (m->cap - 1))
        if (SLOT_HASH(m->slots[j]) == (uint32_t)h && str_eq(r, names[SLOT_AT(m->slots[j])], s)) {
            *found = SLOT_AT(m->slots[j]);
            return 0;
        }
    if (grow_names == NULL) {
        *found = UINT32_MAX;
        return 0;
    }
    if (n == *cap_names && grow((void **)grow_names, cap_names, n + 1, sizeof(V)) < 0)
        return DECLINE(r, "out of memory");
    (*grow_names)[n] = s;
    m->slots[j] = SLOT(h, n);
    *found = (uint32_t)n;
    return 1; /* new */
}

static int extract(R *r, Out *o) {
    V f[MAX_FIELDS]; /* state_dict_metadata, storage_data, ... */
    TRY(fields(r, r->root, K_METADATA, f));
    if (f[0] == ABSENT || f[1] == ABSENT || TAG(f[0]) != T_DICT || TAG(f[1]) != T_DICT)
        return DECLINE(r, "the metadata's mappings");
    const Seq *entries = &r->dicts[PAY(f[0])], *storage = &r->dicts[PAY(f[1])];
    for (uint32_t i = 0; i < entries->len; i++) {
        V key = r->dict_pool.v[entries->start + 2 * i], value = r->dict_pool.v[entries->start + 2 * i + 1];
        if (TAG(key) != T_STR) return DECLINE(r, "a key not a string");
        if (o->n_entries == o->cap_entries &&
            grow((void **)&o->entries, &o->cap_entries, o->n_entries + 1, sizeof(Entry)) < 0)
            return DECLINE(r, "out of memory");
        Entry *entry = &o->entries[o->n_entries++];
        entry->key = key;
        entry->dtype = -1;
        entry->size = ABSENT;
        entry->chunk_start = entry->chunk_count = 0;
        if (TAG(value) == T_RECORD && REC_KIND(r, value) == K_BYTES) {
            V none[MAX_FIELDS];
            TRY(fields(r, value, K_BYTES, none));
        } else
            TRY(tensor(r, o, entry, value));
    }
    StrMap groups = {NULL, 0}, paths = {NULL, 0};
    int status = 0;
    for (uint32_t i = 0; i < storage->len && status >= 0; i++) {
        V index = r->dict_pool.v[storage->start + 2 * i], info = r->dict_pool.v[storage->start + 2 * i + 1];
        V x[MAX_FIELDS], s[MAX_FIELDS]; /* fqn, offset, index; relative_path, offset, length, transforms */
        if ((status = fields(r, index, K_INDEX, x)) < 0 || (status = fields(r, info, K_INFO, s)) < 0) break;
        status = -1;
        if (x[0] == ABSENT || TAG(x[0]) != T_STR) {
            DECLINE(r, "a storage index without a key");
            break;
        }
        if (x[1] != ABSENT && TAG(x[1]) != T_NONE && !size_ok(r, x[1])) {
            DECLINE(r, "a storage index's offsets");
            break;
        }
        if (x[2] != ABSENT && TAG(x[2]) != T_NONE && !extent(r, x[2])) {
            DECLINE(r, "a storage index's index");
            break;
        }
        if (s[0] == ABSENT || TAG(s[0]) != T_STR || s[1] == ABSENT || !extent(r, s[1]) || s[2] == ABSENT ||
            !extent(r, s[2])) {
            DECLINE(r, "a stored item");
            break;
        }
        if (s[3] != ABSENT && TAG(s[3]) != T_NONE && !(TAG(s[3]) == T_LIST && r->lists[PAY(s[3])].len == 0) &&
            !(TAG(s[3]) == T_TUPLE && tuple_len(r, s[3]) == 0)) {
            DECLINE(r, "a stored item's transforms");
            break;
        }
        if (o->n_items == o->cap_items && grow((void **)&o->items, &o->cap_items, o->n_items + 1, sizeof(Item)) < 0) {
            DECLINE(r, "out of memory");
            break;
        }
        Item *item = &o->items[o->n_items++];
        item->fqn = x[0];
        item->offsets = x[1] == ABSENT || TAG(x[1]) == T_NONE ? ABSENT : x[1];
        if (item->offsets != ABSENT && spend(r, o, tuple_len(r, item->offsets)) < 0) break;
        item->path = s[0];
        item->offset = int_of(r, s[1]);
        item->length = int_of(r, s[2]);
        if (strmap_find(r, &groups, o->groups, o->n_groups, x[0], &item->group, &o->groups, &o->cap_groups) < 0)
            break;
        if (item->group == o->n_groups) o->n_groups++;
        if (strmap_find(r, &paths, o->paths, o->n_paths, s[0], &item->path_id, &o->paths, &o->cap_paths) < 0) break;
        if (item->path_id == o->n_paths) o->n_paths++;
        status = 0;
    }
    free(groups.slots);
    free(paths.slots);
    return status;
}

/* --------------------------------------------------------------------------------------------------- the tables */
static int load_name(PyObject *o, Name *out) {
    char *s;
    if (PyBytes_AsStringAndSize(o, &s, &out->n) < 0) return -1;
    out->s = s;
    return 0;
}

/* tables: (globals: ((module, name, kind, arg), ...), behaviours: (int per record kind), fields: ((names...) per
 * record kind), layouts: (names...), limits: (max_dims, max_extent, max_chunks, highest_protocol, properties_len,
 * properties_dtype, values_per_byte, values_base, max_objects), dtypes: (torch.dtype by number)); all names bytes. The objects stay referenced by the caller during the call. */
static int load_tables(PyObject *tables, Tables *t) {
    PyObject *globals, *behaviours, *fields, *layouts;
    memset(t, 0, sizeof(*t));
    if (!PyArg_ParseTuple(tables, "O!O!O!O!(LLLLLLLLL)O!:tables", &PyTuple_Type, &globals, &PyTuple_Type,
                          &behaviours, &PyTuple_Type, &fields, &PyTuple_Type, &layouts, &t->max_dims, &t->max_extent,
                          &t->max_chunks, &t->highest_protocol, &t->properties_len, &t->properties_dtype,
                          &t->values_per_byte, &t->values_base, &t->max_objects, &PyTuple_Type, &t->dtypes))
        return -1;
    t->n_kinds = (int)PyTuple_GET_SIZE(behaviours);
    if (t->n_kinds < K_COUNT_READ || t->n_kinds > MAX_KINDS || PyTuple_GET_SIZE(fields) != t->n_kinds) {
        PyErr_SetString(PyExc_ValueError, "record kinds");
        return -1;
    }
    for (int k = 0; k < t->n_kinds; k++) {
        t->behaviour[k] = (int)PyLong_AsLong(PyTuple_GET_ITEM(behaviours, k));
        PyObject *names = PyTuple_GET_ITEM(fields, k);
        if (!PyTuple_Check(names) || PyTuple_GET_SIZE(names) > MAX_FIELDS) {
            PyErr_SetString(PyExc_ValueError, "fields");
            return -1;
        }
        t->n_fields[k] = (int)PyTuple_GET_SIZE(names);
        for (int f = 0; f < t->n_fields[k]; f++)
            if (load_name(PyTuple_GET_ITEM(names, f), &t->fields[k][f]) < 0) return -1;
    }
    if (PyErr_Occurred()) return -1;
    for (int k = 0; k < K_COUNT_READ; k++)
        if (t->behaviour[k] != (k == K_PROPERTIES ? B_STATE : B_PLAIN)) {
            PyErr_SetString(PyExc_ValueError, "a record kind read does not behave as the reader reads it");
            return -1;
        }
    if (t->n_fields[K_METADATA] < 2 || t->n_fields[K_TENSOR] != 3 || t->n_fields[K_CHUNK] != 2 ||
        t->n_fields[K_INDEX] != 3 || t->n_fields[K_INFO] != 4 || t->properties_dtype < 0 ||
        t->properties_dtype >= t->n_fields[K_PROPERTIES] || t->properties_dtype >= t->properties_len ||
        t->max_extent >= INT_LIMIT || t->values_per_byte < 0 || t->values_per_byte > 1024 || t->values_base < 0 ||
        t->values_base > ((int64_t)1 << 40) || t->max_objects < 1 || t->max_objects > MAX_PAYLOAD) {
        PyErr_SetString(PyExc_ValueError, "the tables do not fit the reader");
        return -1;
    }
    t->n_layouts = PyTuple_GET_SIZE(layouts);
    t->layouts = PyMem_Calloc((size_t)t->n_layouts + 1, sizeof(Name));
    t->n_globals = PyTuple_GET_SIZE(globals);
    t->globals = PyMem_Calloc((size_t)t->n_globals + 1, sizeof(Global));
    if (t->layouts == NULL || t->globals == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < t->n_layouts; i++)
        if (load_name(PyTuple_GET_ITEM(layouts, i), &t->layouts[i]) < 0) return -1;
    for (Py_ssize_t i = 0; i < t->n_globals; i++) {
        Global *g = &t->globals[i];
        PyObject *module, *name;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(globals, i), "SSii", &module, &name, &g->kind, &g->arg)) return -1;
        Name m, n;
        if (load_name(module, &m) < 0 || load_name(name, &n) < 0) return -1;
        g->module = m.s;
        g->module_len = m.n;
        g->name = n.s;
        g->name_len = n.n;
        if (g->kind == G_RECORD && (g->arg < 0 || g->arg >= t->n_kinds)) {
            PyErr_SetString(PyExc_ValueError, "a record kind");
            return -1;
        }
        if (g->kind == G_DTYPE && (g->arg < 0 || g->arg >= PyTuple_GET_SIZE(t->dtypes))) {
            PyErr_SetString(PyExc_ValueError, "a dtype");
            return -1;
        }
    }
    return 0;
}

static void free_vals(Vals *v) {
    free(v->v);
    memset(v, 0, sizeof(Vals));
}

static void free_graph(R *r, int keep_tuples) {
    free_vals(&r->stack);
    if (!keep_tuples) { /* and the strings and ints, and the strings' hashes, which result's maps use */
        free_vals(&r->tuples);
        free(r->strs);
        free(r->bigs);
        r->strs = NULL;
        r->bigs = NULL;
        free(r->longs);
        free(r->by_start);
        free(r->by_hash);
        r->longs = NULL;
        r->by_start = r->by_hash = NULL;
    }
    free_vals(&r->dict_pool);
    free_vals(&r->list_pool);
    free_vals(&r->records);
    free(r->kinds);
    r->kinds = NULL;
    free_vals(&r->memo);
    free(r->marks);
    free(r->dicts);
    free(r->lists);
    for (size_t i = 0; i < r->n_indexes; i++) free(r->indexes[i].slots);
    free(r->indexes);
    r->marks = NULL;
    r->dicts = r->lists = NULL;
    r->indexes = NULL;
    r->n_indexes = 0;
}

static void free_out(Out *o) {
    free(o->entries);
    free(o->chunks);
    free(o->items);
    free(o->groups);
    free(o->paths);
}

static PyObject *str_of(const R *r, V s) {
    return PyUnicode_DecodeUTF8((const char *)str_bytes(r, s), (Py_ssize_t)str_len(r, s), "strict");
}

static PyObject *ints_of(const R *r, V size) {
    PyObject *t = PyTuple_New((Py_ssize_t)tuple_len(r, size));
    if (t == NULL) return NULL;
    for (size_t i = 0; i < tuple_len(r, size); i++) {
        PyObject *x = PyLong_FromLongLong(int_of(r, items_of(r, size)[i]));
        if (x == NULL) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, (Py_ssize_t)i, x);
    }
    return t;
}

/* a tuple of n items (references stolen; NULL if any is, or if it cannot be made) */
static PyObject *tuple_of(Py_ssize_t n, ...) {
    PyObject *t = PyTuple_New(n);
    va_list items;
    va_start(items, n);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *x = va_arg(items, PyObject *);
        if (t != NULL && x != NULL)
            PyTuple_SET_ITEM(t, i, x);
        else {
            Py_XDECREF(x);
            Py_CLEAR(t);
        }
    }
    va_end(items);
    return t;
}

/* the Python result: (sizes, tensors, byte_keys, groups, chunks, items, offsets, paths), what CheckpointMetadata
 * holds, made here rather than from lists in Python:
 *   sizes: {key: size} and tensors: {key: (dtype, size, where its chunks start in `chunks`, chunks)}, the tensor
 *   keys in the metadata's order; byte_keys: frozenset of the others; chunks: int64s, per chunk its offsets then its
 *   sizes; groups: {fqn: (first item, items)} in order of first appearance, items grouped so; items: int64s, 5 per
 *   item: path number, offset, length, dimensions of its offsets (-1: None), where its offsets start in `offsets`
 *   (int64s); paths: [str]. */
static PyObject *result(R *r, Out *o, const Tables *t) {
    PyObject *sizes = NULL, *tensors = NULL, *byte_keys = NULL, *chunks = NULL, *groups = NULL, *items = NULL;
    PyObject *offsets = NULL, *paths = NULL, *out = NULL;
    PyObject **keys = NULL; /* each entry's key */
    size_t n_keys = 0;
    uint32_t *first = NULL, *count = NULL;
    uint32_t *entry_of = NULL;
    V *names = NULL;
    size_t n_names = 0, cap_names = 0;
    StrMap by_name = {NULL, 0};
    size_t n_offsets = 0;
    sizes = PyDict_New();
    tensors = PyDict_New();
    byte_keys = PyFrozenSet_New(NULL); /* filled before anything else sees it */
    groups = PyDict_New();
    paths = PyList_New((Py_ssize_t)o->n_paths);
    chunks = PyBytes_FromStringAndSize((const char *)o->chunks, (Py_ssize_t)(o->n_chunks * 8));
    keys = malloc((o->n_entries + 1) * sizeof(PyObject *));
    if (!sizes || !tensors || !byte_keys || !groups || !paths || !chunks) goto done;
    if (keys == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (size_t i = 0; i < o->n_entries; i++) {
        const Entry *e = &o->entries[i];
        PyObject *key = str_of(r, e->key);
        if (key == NULL) goto done;
        keys[n_keys++] = key;
        if (e->dtype < 0) {
            if (PySet_Add(byte_keys, key) < 0) goto done;
            continue;
        }
        PyObject *size = ints_of(r, e->size), *row = NULL;
        if (size != NULL && e->dtype < PyTuple_GET_SIZE(t->dtypes))
            row = tuple_of(4, Py_NewRef(PyTuple_GET_ITEM(t->dtypes, e->dtype)), Py_NewRef(size),
                           PyLong_FromUnsignedLongLong(e->chunk_start), PyLong_FromUnsignedLongLong(e->chunk_count));
        else if (size != NULL)
            PyErr_SetString(PyExc_ValueError, "a dtype");
        int failed = row == NULL || PyDict_SetItem(sizes, key, size) < 0 || PyDict_SetItem(tensors, key, row) < 0;
        Py_XDECREF(row);
        Py_XDECREF(size);
        if (failed) goto done;
    }
    for (size_t i = 0; i < o->n_paths; i++) {
        PyObject *p = str_of(r, o->paths[i]);
        if (p == NULL) goto done;
        PyList_SET_ITEM(paths, (Py_ssize_t)i, p);
    }
    first = calloc(o->n_groups + 1, sizeof(uint32_t));
    count = calloc(o->n_groups + 1, sizeof(uint32_t));
    if (!first || !count) {
        PyErr_NoMemory();
        goto done;
    }
    for (size_t i = 0; i < o->n_items; i++) {
        count[o->items[i].group]++;
        if (o->items[i].offsets != ABSENT) n_offsets += tuple_len(r, o->items[i].offsets);
    }
    /* a group's key is the entry's key string when there is one (one str object for both) */
    entry_of = malloc((o->n_entries + 1) * sizeof(uint32_t));
    if (entry_of == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (size_t i = 0; i < o->n_entries; i++) {
        uint32_t found;
        int added = strmap_find(r, &by_name, names, n_names, o->entries[i].key, &found, &names, &cap_names);
        if (added < 0) {
            PyErr_NoMemory();
            goto done;
        }
        if (added) entry_of[n_names++] = (uint32_t)i;
    }
    for (size_t g = 0, at = 0; g < o->n_groups; g++) {
        first[g] = (uint32_t)at;
        at += count[g];
        uint32_t key = UINT32_MAX;
        if (strmap_find(r, &by_name, names, n_names, o->groups[g], &key, NULL, NULL) < 0) {
            PyErr_NoMemory();
            goto done;
        }
        PyObject *fqn, *span;
        fqn = key != UINT32_MAX ? Py_NewRef(keys[entry_of[key]]) : str_of(r, o->groups[g]);
        span = fqn ? tuple_of(2, PyLong_FromUnsignedLong(first[g]), PyLong_FromUnsignedLong(count[g])) : NULL;
        int failed = span == NULL || PyDict_SetItem(groups, fqn, span) < 0;
        Py_XDECREF(fqn);
        Py_XDECREF(span);
        if (failed) goto done;
    }
    items = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(o->n_items * 5 * 8));
    offsets = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(n_offsets * 8));
    if (!items || !offsets) goto done;
    int64_t *rows = (int64_t *)PyBytes_AS_STRING(items), *offs = (int64_t *)PyBytes_AS_STRING(offsets);
    size_t at_offsets = 0;
    for (size_t i = 0; i < o->n_items; i++) {
        const Item *it = &o->items[i];
        int64_t *row = rows + 5 * (size_t)first[it->group]++;
        row[0] = it->path_id;
        row[1] = it->offset;
        row[2] = it->length;
        row[3] = it->offsets == ABSENT ? -1 : (int64_t)tuple_len(r, it->offsets);
        row[4] = (int64_t)at_offsets;
        if (it->offsets != ABSENT)
            for (size_t j = 0; j < tuple_len(r, it->offsets); j++)
                offs[at_offsets++] = int_of(r, items_of(r, it->offsets)[j]);
    }
    out = PyTuple_Pack(8, sizes, tensors, byte_keys, groups, chunks, items, offsets, paths);
done:
    for (size_t i = 0; i < n_keys; i++) Py_DECREF(keys[i]);
    free(keys);
    free(first);
    free(count);
    free(entry_of);
    free(names);
    free(by_name.slots);
    Py_XDECREF(sizes);
    Py_XDECREF(tensors);
    Py_XDECREF(byte_keys);
    Py_XDECREF(groups);
    Py_XDECREF(chunks);
    Py_XDECREF(items);
    Py_XDECREF(offsets);
    Py_XDECREF(paths);
    return out;
}

static PyObject *read_metadata(PyObject *self, PyObject *args) {
    Py_buffer data;
    PyObject *tables;
    Tables t;
    if (!PyArg_ParseTuple(args, "y*O!:read", &data, &PyTuple_Type, &tables)) return NULL;
    if (load_tables(tables, &t) < 0) {
        PyMem_Free(t.layouts);
        PyMem_Free(t.globals);
        PyBuffer_Release(&data);
        return NULL;
    }
    R r;
    Out o;
    memset(&r, 0, sizeof(r));
    memset(&o, 0, sizeof(o));
    r.d = data.buf;
    r.end = (size_t)data.len;
    r.t = &t;
    o.values_left = (uint64_t)t.values_per_byte * (uint64_t)data.len + (uint64_t)t.values_base;
    r.seed = mix((uint64_t)(uintptr_t)&r ^ (uint64_t)(uintptr_t)data.buf ^ (uint64_t)data.len);
    int status;
    Py_BEGIN_ALLOW_THREADS
    if (r.end > MAX_START)
        status = DECLINE(&r, "the data too large");
    else {
        status = run(&r);
        free_vals(&r.memo); /* what extract reads is reachable from the root */
        if (status == 0) status = extract(&r, &o);
    }
    /* the graph is not needed past here: what is kept is in `o`, strings as offsets into the data */
    Py_END_ALLOW_THREADS
    PyObject *out;
    if (status == 0) {
        free_graph(&r, 1); /* all but the tuple pool, which holds the sizes and offsets `o` names */
        out = result(&r, &o, &t);
    } else
        out = PyUnicode_FromString(r.why ? r.why : "declined");
    free_graph(&r, 0);
    free_out(&o);
    PyMem_Free(t.layouts);
    PyMem_Free(t.globals);
    PyBuffer_Release(&data);
    return out;
}

/* --------------------------------------------------------------------- what the lazy wrappers convert, when asked */
/* a namedtuple of `cls` (a tuple subclass with no fields of its own), its items given (references stolen) */
static PyObject *named(PyTypeObject *cls, PyObject **items, Py_ssize_t n) {
    PyObject *o = NULL;
    for (Py_ssize_t i = 0; i < n; i++)
        if (items[i] == NULL) goto fail;
    o = cls->tp_alloc(cls, n);
    if (o == NULL) goto fail;
    for (Py_ssize_t i = 0; i < n; i++) PyTuple_SET_ITEM(o, i, items[i]);
    return o;
fail:
    for (Py_ssize_t i = 0; i < n; i++) Py_XDECREF(items[i]);
    return NULL;
}

static int plain_tuple_class(PyObject *cls, Py_ssize_t n) {
    if (!PyType_Check(cls) || !PyType_IsSubtype((PyTypeObject *)cls, &PyTuple_Type) ||
        ((PyTypeObject *)cls)->tp_basicsize != PyTuple_Type.tp_basicsize ||
        ((PyTypeObject *)cls)->tp_dictoffset != 0) {
        PyErr_SetString(PyExc_TypeError, "expected a namedtuple class");
        return 0;
    }
    (void)n;
    return 1;
}

static PyObject *ints_at(const int64_t *v, Py_ssize_t n) {
    PyObject *t = PyTuple_New(n);
    if (t == NULL) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *x = PyLong_FromLongLong(v[i]);
        if (x == NULL) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, i, x);
    }
    return t;
}

/* chunks(values, first, count, ndim, Chunk): `count` chunks of `read`'s chunk values from `first` as a tuple of
 * Chunk(offsets, sizes) */
static PyObject *chunks(PyObject *self, PyObject *args) {
    Py_buffer b;
    Py_ssize_t first, count, ndim;
    PyObject *cls, *out = NULL;
    if (!PyArg_ParseTuple(args, "y*nnnO:chunks", &b, &first, &count, &ndim, &cls)) return NULL;
    Py_ssize_t n = b.len / 8;
    if (!plain_tuple_class(cls, 2)) goto done;
    if (first < 0 || count < 0 || ndim < 0 || first > n || (ndim && count > (n - first) / (2 * ndim))) {
        PyErr_SetString(PyExc_ValueError, "chunks outside the values");
        goto done;
    }
    const int64_t *v = (const int64_t *)b.buf + first;
    out = PyTuple_New(count);
    for (Py_ssize_t i = 0; out && i < count; i++) {
        PyObject *items[2] = {ints_at(v + 2 * ndim * i, ndim), ints_at(v + 2 * ndim * i + ndim, ndim)};
        PyObject *chunk = named((PyTypeObject *)cls, items, 2);
        if (chunk == NULL) Py_CLEAR(out);
        else PyTuple_SET_ITEM(out, i, chunk);
    }
done:
    PyBuffer_Release(&b);
    return out;
}

/* items(rows, offsets, first, count, paths, StoredItem): `count` of `read`'s stored item rows from `first` as a dict
 * chunk offsets (None: none) -> StoredItem(path, offset, length), the last one kept for equal offsets where the
 * first was, as a dict assigned in order keeps */
static PyObject *items(PyObject *self, PyObject *args) {
    Py_buffer rows, offs;
    Py_ssize_t first, count;
    PyObject *paths, *cls, *out = NULL;
    if (!PyArg_ParseTuple(args, "y*y*nnO!O:items", &rows, &offs, &first, &count, &PyList_Type, &paths, &cls))
        return NULL;
    Py_ssize_t n_rows = rows.len / 40, n_offs = offs.len / 8;
    if (!plain_tuple_class(cls, 4)) goto done;
    if (first < 0 || count < 0 || first > n_rows || count > n_rows - first) {
        PyErr_SetString(PyExc_ValueError, "items outside the rows");
        goto done;
    }
    out = PyDict_New();
    for (Py_ssize_t i = 0; out && i < count; i++) {
        const int64_t *row = (const int64_t *)rows.buf + 5 * (first + i);
        PyObject *key;
        if (row[0] < 0 || row[0] >= PyList_GET_SIZE(paths) || row[3] < -1 || row[4] < 0 || row[4] > n_offs ||
            (row[3] > 0 && row[3] > n_offs - row[4])) {
            PyErr_SetString(PyExc_ValueError, "an item outside the arrays");
            Py_CLEAR(out);
            break;
        }
        if (row[3] < 0) key = Py_NewRef(Py_None);
        else key = ints_at((const int64_t *)offs.buf + row[4], (Py_ssize_t)row[3]);
        PyObject *fields[4] = {Py_NewRef(PyList_GET_ITEM(paths, row[0])), PyLong_FromLongLong(row[1]),
                               PyLong_FromLongLong(row[2]), PyTuple_New(0)};
        PyObject *item = named((PyTypeObject *)cls, fields, 4);
        if (key == NULL || item == NULL || PyDict_SetItem(out, key, item) < 0) Py_CLEAR(out);
        Py_XDECREF(key);
        Py_XDECREF(item);
    }
done:
    PyBuffer_Release(&rows);
    PyBuffer_Release(&offs);
    return out;
}

static PyMethodDef methods[] = {
    {"read", read_metadata, METH_VARARGS,
     "read(data, tables): .metadata's keys, tensors, chunks and stored items as arrays, or a str: why it declined "
     "(offline/dcp_metadata.py)."},
    {"chunks", chunks, METH_VARARGS, "chunks(values, first, count, ndim, Chunk): a tensor's chunks, of read's arrays."},
    {"items", items, METH_VARARGS, "items(rows, offsets, first, count, paths, StoredItem): a key's stored items."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_dcp_metadata", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__dcp_metadata(void) { return PyModule_Create(&module); }
