/* check_pickle's walk in C: the same algorithm as io/torch_save.py's `_walk` (the reference, whose docstrings say
 * why it is sound), opcode by opcode, with the opcode facts (argument sizes, stack effects) taken from the tables
 * Python builds (`_tables`), so both walks read one source. walk(data, tables) -> None when the pickle passes, else
 * (code, byte, value, value) as torch_save._message words it. tests/io/test_pickle_walk.py pins that both walks
 * answer the same on generated and hostile pickles.
 *
 * Every stack and memo entry is steps << 8 | tuple depth as in Python. Bounds that make 64-bit integers enough:
 * a tuple's steps are refused past the pickle's size + 1024 (sums are cut at that bound plus one, which refuses as
 * the unbounded sum would); the hashing budget (4x the size + 64 Ki) is never below zero when an opcode starts, and
 * sums spent from it are cut at the budget plus one. Memo indices stored are at most the pickle's size (checked, as
 * in Python), so the memo array holds at most size + 1 entries. The GIL is released during the walk. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int64_t *v;
    Py_ssize_t n, cap;
} Vec;

typedef struct {
    int64_t code, at, a, b;
    int a_unsigned; /* `a` is an unsigned 8-byte length (BINUNICODE8 and its kind) */
} Refusal;

enum { OK = 0, REFUSED = 1, NO_MEMORY = 2 };

static int reserve(Vec *s, Py_ssize_t need) {
    if (need <= s->cap) return 0;
    Py_ssize_t cap = s->cap ? s->cap : 64;
    while (cap < need) cap *= 2;
    int64_t *v = realloc(s->v, (size_t)cap * sizeof(int64_t));
    if (v == NULL) return -1;
    s->v = v;
    s->cap = cap;
    return 0;
}

static int push(Vec *s, int64_t x) {
    if (s->n == s->cap && reserve(s, s->n + 1) < 0) return -1;
    s->v[s->n++] = x;
    return 0;
}

typedef struct {
    int64_t *v; /* -1: never stored */
    uint64_t cap;
    int64_t filled; /* distinct indices stored: where MEMOIZE stores, as in CPython's unpickler */
} Memo;

static int memo_set(Memo *m, uint64_t key, int64_t value) {
    if (key >= m->cap) {
        uint64_t cap = m->cap ? m->cap * 2 : 1024;
        if (cap <= key) cap = key + 1;
        int64_t *v = realloc(m->v, (size_t)cap * sizeof(int64_t));
        if (v == NULL) return -1;
        memset(v + m->cap, 0xff, (size_t)(cap - m->cap) * sizeof(int64_t));
        m->v = v;
        m->cap = cap;
    }
    if (m->v[key] < 0) m->filled++;
    m->v[key] = value;
    return 0;
}

static int64_t memo_get(const Memo *m, uint64_t key) { return key < m->cap && m->v[key] >= 0 ? m->v[key] : 256; }

/* int.from_bytes(data[pos : pos + n], "little"): fewer bytes at the end of the data */
static uint64_t read_le(const unsigned char *d, Py_ssize_t pos, int n, Py_ssize_t end, int *got) {
    int k = 0;
    uint64_t x = 0;
    for (; k < n && pos + k < end; k++) x |= (uint64_t)d[pos + k] << (8 * k);
    if (got) *got = k;
    return x;
}

#define MAX_TUPLE_DEPTH 100
#define MAX_INDEX_DIGITS 18

typedef struct {
    const unsigned char *d;
    Py_ssize_t end;
    const unsigned char *table;
    Vec stack, marks;
    Memo memo;
    int64_t budget, tuple_budget;
    Refusal *out;
} Walk;

static int refuse(Walk *w, int64_t code, int64_t at, int64_t a, int64_t b) {
    w->out->code = code;
    w->out->at = at;
    w->out->a = a;
    w->out->b = b;
    return REFUSED;
}

/* _tuple: a new tuple's item, refused when too deep or of more steps than the pickle has bytes */
static int new_tuple(Walk *w, int64_t item, Py_ssize_t at) {
    int64_t depth = item & 255;
    if (depth > MAX_TUPLE_DEPTH) return refuse(w, 8, at, depth, 0);
    if ((item >> 8) > w->tuple_budget) return refuse(w, 9, at, 0, 0);
    return OK;
}

/* _step: an opcode's effect described by its table row */
static int step(Walk *w, int op, Py_ssize_t at) {
    Vec *s = &w->stack, *m = &w->marks;
    const unsigned char *t = w->table + 8 * op;
    int marked = t[3], below = t[4], leaves = t[5], built = t[6], hashed = t[7];
    if (op == 0x32) /* DUP */
        return push(s, s->n ? s->v[s->n - 1] : 256) < 0 ? NO_MEMORY : OK;
    if (op == 0x30 && m->n && m->v[m->n - 1] == s->n) { /* POP of a mark */
        m->n--;
        return OK;
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
    if (below > s->n) return refuse(w, 6, at, 0, 0);
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
        int r = new_tuple(w, item, at);
        if (r != OK) return r;
        return push(s, item) < 0 ? NO_MEMORY : OK;
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
        int r = new_tuple(w, result, at);
        if (r != OK) return r;
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
            if (spent > w->budget) return refuse(w, 7, at, 0, 0);
        }
        w->budget -= spent;
    }
    if (leaves) return push(s, result) < 0 ? NO_MEMORY : OK;
    return OK;
}

static int is_space(unsigned char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == 0x0b || c == 0x0c; }

/* a PUT or GET line: ASCII digits (surrounding whitespace stripped, as bytes.strip), at most MAX_INDEX_DIGITS of
 * them, a number at most the pickle's size; -1 otherwise */
static int64_t memo_index(const unsigned char *d, Py_ssize_t from, Py_ssize_t to, Py_ssize_t end) {
    while (from < to && is_space(d[from])) from++;
    while (to > from && is_space(d[to - 1])) to--;
    if (to == from || to - from > MAX_INDEX_DIGITS) return -1;
    int64_t x = 0;
    for (Py_ssize_t i = from; i < to; i++) {
        if (d[i] < '0' || d[i] > '9') return -1;
        x = x * 10 + (d[i] - '0');
    }
    return x <= end ? x : -1;
}

#define TOP (s->v[s->n - 1])
#define UNDER return refuse(w, 6, at, 0, 0)
#define PUSH(x)                                 \
    do {                                        \
        if (push(s, (x)) < 0) return NO_MEMORY; \
    } while (0)

static int run(Walk *w) {
    const unsigned char *d = w->d, *table = w->table;
    Py_ssize_t end = w->end, at = 0, frame = -1, limit = end; /* as in Python: the current frame, where it ends */
    Vec *s = &w->stack, *m = &w->marks;
next_frame:
    while (at < limit) {
        int op = d[at];
        const unsigned char *t = table + 8 * op;
        if (t[0] >= 2) {
            int n = t[0] - 2, r;
            switch (t[1]) {
                case 0: /* pushes one item that hashes in one step */
                    PUSH(256);
                    break;
                case 2: /* MEMOIZE */
                    if (!s->n) UNDER;
                    if (memo_set(&w->memo, (uint64_t)w->memo.filled, TOP) < 0) return NO_MEMORY;
                    break;
                case 3: /* BINGET, LONG_BINGET */
                    PUSH(memo_get(&w->memo, read_le(d, at + 1, n, end, NULL)));
                    break;
                case 1: /* takes one, leaves one such item */
                    if (!s->n) UNDER;
                    TOP = 256;
                    break;
                case 5: /* MARK */
                    if (push(m, s->n) < 0) return NO_MEMORY;
                    break;
                case 11: /* REDUCE, NEWOBJ: the result may be a tuple of the arguments */
                    if (s->n < 2) UNDER;
                    w->budget -= s->v[--s->n] >> 8;
                    TOP = s->v[s->n];
                    if (w->budget < 0) return refuse(w, 7, at, 0, 0);
                    break;
                case 12: /* BUILD: the object stays what it was */
                    if (s->n < 2) UNDER;
                    w->budget -= s->v[--s->n] >> 8;
                    if (w->budget < 0) return refuse(w, 7, at, 0, 0);
                    break;
                case 13: { /* SETITEMS: the keys, summed as items then shifted, as in Python */
                    if (!m->n) UNDER;
                    int64_t mark = m->v[--m->n], sum = 0, limit = (w->budget + 1) << 8;
                    int over = 0;
                    for (Py_ssize_t i = (Py_ssize_t)mark; i < s->n && !over; i += 2) {
                        sum += s->v[i];
                        over = sum >= limit;
                    }
                    if (mark < s->n) s->n = (Py_ssize_t)mark;
                    if (over) return refuse(w, 7, at, 0, 0);
                    w->budget -= sum >> 8;
                    break;
                }
                case 14: { /* APPENDS */
                    if (!m->n) UNDER;
                    int64_t mark = m->v[--m->n];
                    if (mark < s->n) s->n = (Py_ssize_t)mark;
                    break;
                }
                case 8: /* EMPTY_TUPLE */
                    PUSH(257);
                    break;
                case 9: /* TUPLE1 */
                    if (!s->n) UNDER;
                    if ((r = new_tuple(w, TOP + 257, at)) != OK) return r;
                    TOP += 257;
                    break;
                case 10: { /* TUPLE2 */
                    if (s->n < 2) UNDER;
                    int64_t second = s->v[--s->n], first = TOP;
                    int64_t shallower = (first & 255) < (second & 255) ? first & 255 : second & 255;
                    int64_t item = first + second - shallower + 257;
                    if ((r = new_tuple(w, item, at)) != OK) return r;
                    TOP = item;
                    break;
                }
                case 4: /* BINPUT */
                    if (at + 1 >= end || !s->n) UNDER;
                    if (memo_set(&w->memo, d[at + 1], TOP) < 0) return NO_MEMORY;
                    break;
                case 7: /* nothing on the stack */
                    break;
                default:
                    if ((r = step(w, op, at)) != OK) return r;
            }
            at += 1 + n;
            continue;
        }
        if (t[0] == 0) return refuse(w, 1, at, op, 0);
        int kind = t[2];
        at += 1;
        if (kind == 1) return OK; /* STOP */
        if (kind == 2) {         /* LONG_BINPUT */
            uint64_t index = read_le(d, at, 4, end, NULL);
            if (index > (uint64_t)end) return refuse(w, 2, at - 1, 0, 0);
            if (s->n && memo_set(&w->memo, index, TOP) < 0) return NO_MEMORY;
            at += 4;
        } else if (kind == 9) { /* FRAME: the opcodes of its length follow, and it ends where one ends */
            at += 8;
            if (at <= limit) { /* else its length crosses the frame it is in (or the data's end): below */
                if (frame >= 0 && at != limit) return refuse(w, 12, at - 9, limit, 0);
                uint64_t length = read_le(d, at - 8, 8, end, NULL);
                if (length > (uint64_t)(end - at)) {
                    refuse(w, 3, at - 9, (int64_t)length, end - at);
                    w->out->a_unsigned = 1;
                    return REFUSED;
                }
                frame = at - 9;
                limit = at + (Py_ssize_t)length;
            }
        } else if (kind >= 5) { /* a declared length, then that many bytes */
            int width = kind == 5 ? 1 : kind == 8 ? 8 : 4, got;
            uint64_t raw = read_le(d, at, width, end, &got);
            int64_t length;
            if (kind == 6 && got > 0 && got < 8 && (raw >> (8 * got - 1)) & 1) /* signed: extend from its bytes */
                length = (int64_t)(raw | (~(uint64_t)0 << (8 * got)));
            else
                length = (int64_t)raw;
            int huge = kind == 8 && (raw >> 63); /* an unsigned length past int64 */
            Py_ssize_t left = end - at - width;  /* bytes after the length field */
            if (at + width > end || huge || length < 0 || (uint64_t)length > (uint64_t)left) {
                refuse(w, 3, at - 1, (int64_t)raw, left > 0 ? left : 0);
                if (kind != 8) w->out->a = length;
                w->out->a_unsigned = kind == 8;
                return REFUSED;
            }
            PUSH(256);
            at += width + (Py_ssize_t)length;
        } else { /* one line, or two */
            Py_ssize_t line = at;
            for (int i = 0; i < (kind == 4 ? 2 : 1); i++) {
                const unsigned char *newline = memchr(d + at, '\n', (size_t)(end - at));
                if (newline == NULL) return refuse(w, 4, at, 0, 0);
                at = newline - d + 1;
            }
            if (op == 'p' || op == 'g') {
                int64_t index = memo_index(d, line, at - 1, end);
                if (index < 0) return refuse(w, 5, line - 1, 0, 0);
                if (op == 'g')
                    PUSH(memo_get(&w->memo, (uint64_t)index));
                else if (s->n && memo_set(&w->memo, (uint64_t)index, TOP) < 0)
                    return NO_MEMORY;
            } else {
                int r = step(w, op, line - 1);
                if (r != OK) return r;
            }
        }
    }
    if (frame >= 0 && at > limit) return refuse(w, 11, frame, limit, at);
    if (at >= end) return refuse(w, 10, end, 0, 0);
    frame = -1;
    limit = end;
    goto next_frame;
}

static PyObject *walk(PyObject *self, PyObject *args) {
    Py_buffer data, table;
    if (!PyArg_ParseTuple(args, "y*y*:walk", &data, &table)) return NULL;
    if (table.len != 256 * 8) {
        PyBuffer_Release(&data);
        PyBuffer_Release(&table);
        PyErr_SetString(PyExc_ValueError, "the opcode tables have 2048 bytes");
        return NULL;
    }
    Refusal out = {0, 0, 0, 0, 0};
    Walk w = {data.buf, data.len, table.buf, {NULL, 0, 0}, {NULL, 0, 0}, {NULL, 0, 0}, 0, 0, &out};
    w.budget = 4 * (int64_t)data.len + (1 << 16);
    w.tuple_budget = (int64_t)data.len + 1024;
    int result;
    Py_BEGIN_ALLOW_THREADS
    result = run(&w);
    Py_END_ALLOW_THREADS
    free(w.stack.v);
    free(w.marks.v);
    free(w.memo.v);
    PyBuffer_Release(&data);
    PyBuffer_Release(&table);
    if (result == NO_MEMORY) return PyErr_NoMemory();
    if (result == OK) Py_RETURN_NONE;
    PyObject *a = out.a_unsigned ? PyLong_FromUnsignedLongLong((unsigned long long)out.a) : PyLong_FromLongLong(out.a);
    if (a == NULL) return NULL;
    return Py_BuildValue("(LLNL)", (long long)out.code, (long long)out.at, a, (long long)out.b);
}

static PyMethodDef methods[] = {
    {"walk", walk, METH_VARARGS, "check_pickle's walk (io/torch_save.py): None, or (code, byte, value, value)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_pickle_walk", NULL, -1, methods};

PyMODINIT_FUNC PyInit__pickle_walk(void) { return PyModule_Create(&module); }
