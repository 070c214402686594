/* The hook's reads on the training thread at a save, in C; each is a function of host_snapshot.py (the reference,
 * whose docstring says why it exists), step for step, and tests/test_host_snapshot.py pins that both answer the same.
 *
 * parameters(roots) -> (trainable, other), `_listed_parameters`: every module reachable from
 * `roots` through `_modules`, each once (by identity), is read from its own dictionary (`_parameters`, `_modules`;
 * the attribute when the dictionary lacks the key); unset (None) parameters and children are skipped; a parameter is
 * trainable when its `requires_grad` is true. The order is the reference's: a stack of modules, the last pushed read
 * first, children pushed in their dictionary's order. No Python code runs while a dictionary is iterated (its values
 * are appended to lists first); `requires_grad` is read after the walk.
 *
 * entries_hold(tables, keys, objects, equal_tables, equal_keys, values) -> bool, `_entries_hold`: the cached walk's
 * dictionary lookups (`_Probes`) still find the same objects, and the plain values the same types, then equal
 * values. Each table and key is held while it is looked up (a key's __eq__ is Python code that could change the
 * lists), and every index is checked against the lists' lengths then. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>

static PyObject *str_parameters, *str_modules, *str_values, *str_requires_grad;

/* The modules read so far: an open-addressing set of their addresses (a Python set of ints costs an int object a
 * module). */
typedef struct {
    uintptr_t *slots; /* 0: empty */
    size_t mask, used;
} Seen;

/* An address's first slot: a multiplicative hash whose high bits are folded into the low ones the mask keeps (the
 * low bits of a product depend only on the low bits of the address). */
static size_t first_slot(uintptr_t key, size_t mask) {
    uint64_t h = (uint64_t)(key >> 4) * 0x9E3779B97F4A7C15u;
    return (size_t)(h ^ (h >> 32)) & mask;
}

/* 1 if `p` was there, 0 if added now, -1 out of memory. */
static int seen_add(Seen *s, const void *p) {
    if (2 * (s->used + 1) > s->mask + 1) {
        size_t size = s->slots ? 2 * (s->mask + 1) : 1024;
        uintptr_t *slots = calloc(size, sizeof(uintptr_t));
        if (slots == NULL) return -1;
        for (size_t i = 0; s->slots && i <= s->mask; i++) {
            if (!s->slots[i]) continue;
            size_t j = first_slot(s->slots[i], size - 1);
            while (slots[j]) j = (j + 1) & (size - 1);
            slots[j] = s->slots[i];
        }
        free(s->slots);
        s->slots = slots;
        s->mask = size - 1;
    }
    uintptr_t key = (uintptr_t)p;
    size_t j = first_slot(key, s->mask);
    for (; s->slots[j]; j = (j + 1) & s->mask)
        if (s->slots[j] == key) return 1;
    s->slots[j] = key;
    s->used++;
    return 0;
}

/* Append the values of `table` (a dict, or anything with `.values()`) to `out`. */
static int extend_values(PyObject *out, PyObject *table) {
    if (PyDict_Check(table)) {
        Py_ssize_t pos = 0;
        PyObject *key, *value;
        while (PyDict_Next(table, &pos, &key, &value))
            if (PyList_Append(out, value) < 0) return -1;
        return 0;
    }
    PyObject *values = PyObject_CallMethodNoArgs(table, str_values);
    if (values == NULL) return -1;
    PyObject *it = PyObject_GetIter(values);
    Py_DECREF(values);
    if (it == NULL) return -1;
    PyObject *item;
    while ((item = PyIter_Next(it)) != NULL) {
        int failed = PyList_Append(out, item);
        Py_DECREF(item);
        if (failed < 0) {
            Py_DECREF(it);
            return -1;
        }
    }
    Py_DECREF(it);
    return PyErr_Occurred() ? -1 : 0;
}

/* module.__dict__.get(name) or, when the dictionary lacks it, getattr(module, name): a new reference. */
static PyObject *own(PyObject *dict, PyObject *module, PyObject *name) {
    PyObject *found = PyDict_GetItemWithError(dict, name);
    if (found != NULL) {
        Py_INCREF(found);
        return found;
    }
    if (PyErr_Occurred()) return NULL;
    return PyObject_GetAttr(module, name);
}

static PyObject *parameters(PyObject *Py_UNUSED(self), PyObject *roots) {
    PyObject *stack = PySequence_List(roots), *found = PyList_New(0);
    PyObject *trainable = NULL, *other = NULL;
    Seen seen = {NULL, 0, 0};
    if (stack == NULL || found == NULL) goto fail;
    while (PyList_GET_SIZE(stack) > 0) {
        Py_ssize_t last = PyList_GET_SIZE(stack) - 1;
        PyObject *module = PyList_GET_ITEM(stack, last);
        Py_INCREF(module);
        if (PyList_SetSlice(stack, last, last + 1, NULL) < 0) {
            Py_DECREF(module);
            goto fail;
        }
        if (module == Py_None) {
            Py_DECREF(module);
            continue;
        }
        int visited = seen_add(&seen, module); /* the module is held by the model: its address stays its own */
        if (visited != 0) {
            Py_DECREF(module);
            if (visited < 0) {
                PyErr_NoMemory();
                goto fail;
            }
            continue;
        }
        PyObject *dict = PyObject_GenericGetDict(module, NULL);
        PyObject *params = dict == NULL ? NULL : own(dict, module, str_parameters);
        PyObject *children = params == NULL ? NULL : own(dict, module, str_modules);
        int failed = children == NULL || extend_values(found, params) < 0 || extend_values(stack, children) < 0;
        Py_XDECREF(children);
        Py_XDECREF(params);
        Py_XDECREF(dict);
        Py_DECREF(module);
        if (failed) goto fail;
    }
    trainable = PyList_New(0);
    other = PyList_New(0);
    if (trainable == NULL || other == NULL) goto fail;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(found); i++) {
        PyObject *param = PyList_GET_ITEM(found, i);
        if (param == Py_None) continue;
        PyObject *flag = PyObject_GetAttr(param, str_requires_grad);
        int yes = flag == NULL ? -1 : PyObject_IsTrue(flag);
        Py_XDECREF(flag);
        if (yes < 0 || PyList_Append(yes ? trainable : other, param) < 0) goto fail;
    }
    Py_DECREF(stack);
    Py_DECREF(found);
    free(seen.slots);
    return Py_BuildValue("(NN)", trainable, other);
fail:
    Py_XDECREF(stack);
    Py_XDECREF(found);
    free(seen.slots);
    Py_XDECREF(trainable);
    Py_XDECREF(other);
    return NULL;
}

/* table.get(key) as `dict.get` answers it (None when absent): a new reference, NULL on error. */
static PyObject *entry(PyObject *tables, PyObject *keys, Py_ssize_t i) {
    if (i >= PyList_GET_SIZE(tables) || i >= PyList_GET_SIZE(keys)) {
        PyErr_SetString(PyExc_ValueError, "the probes' lists changed while they were read");
        return NULL;
    }
    PyObject *table = PyList_GET_ITEM(tables, i), *key = PyList_GET_ITEM(keys, i);
    if (!PyDict_Check(table)) {
        PyErr_Format(PyExc_TypeError, "a probed table is a %.100s, not a dict", Py_TYPE(table)->tp_name);
        return NULL;
    }
    Py_INCREF(table);
    Py_INCREF(key);
    PyObject *found = PyDict_GetItemWithError(table, key);
    Py_XINCREF(found);
    Py_DECREF(key);
    Py_DECREF(table);
    if (found == NULL && !PyErr_Occurred()) {
        Py_INCREF(Py_None);
        found = Py_None;
    }
    return found;
}

/* The item of `list` at `i`, or NULL with an error when the list is shorter now: a borrowed reference. */
static PyObject *item(PyObject *list, Py_ssize_t i) {
    if (i < PyList_GET_SIZE(list)) return PyList_GET_ITEM(list, i);
    PyErr_SetString(PyExc_ValueError, "the probes' lists changed while they were read");
    return NULL;
}

static PyObject *entries_hold(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *tables, *keys, *objects, *equal_tables, *equal_keys, *values;
    if (!PyArg_ParseTuple(args, "O!O!O!O!O!O!:entries_hold", &PyList_Type, &tables, &PyList_Type, &keys, &PyList_Type,
                          &objects, &PyList_Type, &equal_tables, &PyList_Type, &equal_keys, &PyList_Type, &values))
        return NULL;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(objects); i++) {
        PyObject *found = entry(tables, keys, i);
        if (found == NULL) return NULL;
        PyObject *object = item(objects, i);
        Py_DECREF(found); /* compared by address only: the tables hold it, or it was never the object */
        if (object == NULL) return NULL;
        if (found != object) Py_RETURN_FALSE;
    }
    /* As the reference: every type first, then the values (plain types: their == runs no Python code) */
    for (int pass = 0; pass < 2; pass++) {
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(values); i++) {
            PyObject *found = entry(equal_tables, equal_keys, i), *value = item(values, i);
            if (found == NULL || value == NULL) {
                Py_XDECREF(found);
                return NULL;
            }
            int same = Py_TYPE(found) == Py_TYPE(value);
            if (same && pass == 1) same = PyObject_RichCompareBool(found, value, Py_EQ);
            Py_DECREF(found);
            if (same < 0) return NULL;
            if (!same) Py_RETURN_FALSE;
        }
    }
    Py_RETURN_TRUE;
}

static PyMethodDef methods[] = {
    {"parameters", parameters, METH_O,
     "parameters(roots) -> (trainable, other): the parameters of every module reachable from roots"},
    {"entries_hold", entries_hold, METH_VARARGS,
     "entries_hold(tables, keys, objects, equal_tables, equal_keys, values) -> bool: the probed lookups still hold"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_hook_reads", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__hook_reads(void) {
    str_parameters = PyUnicode_InternFromString("_parameters");
    str_modules = PyUnicode_InternFromString("_modules");
    str_values = PyUnicode_InternFromString("values");
    str_requires_grad = PyUnicode_InternFromString("requires_grad");
    if (!str_parameters || !str_modules || !str_values || !str_requires_grad) return NULL;
    return PyModule_Create(&module);
}
