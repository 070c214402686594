/* The hook's listing of a model's parameters in C: host_snapshot's `_listed_parameters` (the reference, whose
 * docstring says why it exists), step for step. parameters(roots) -> (trainable, other): every module reachable from
 * `roots` through `_modules`, each once (by identity), is read from its own dictionary (`_parameters`, `_modules`;
 * the attribute when the dictionary lacks the key); unset (None) parameters and children are skipped; a parameter is
 * trainable when its `requires_grad` is true. The order is the reference's: a stack of modules, the last pushed read
 * first, children pushed in their dictionary's order. tests/test_host_snapshot.py pins that both listings give the
 * same lists.
 *
 * No Python code runs while a dictionary is iterated (its values are appended to lists first); `requires_grad` is
 * read after the walk. */
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

/* 1 if `p` was there, 0 if added now, -1 out of memory. */
static int seen_add(Seen *s, const void *p) {
    if (2 * (s->used + 1) > s->mask + 1) {
        size_t size = s->slots ? 2 * (s->mask + 1) : 1024;
        uintptr_t *slots = calloc(size, sizeof(uintptr_t));
        if (slots == NULL) return -1;
        for (size_t i = 0; s->slots && i <= s->mask; i++) {
            if (!s->slots[i]) continue;
            size_t j = (size_t)(s->slots[i] >> 4) * 0x9E3779B97F4A7C15u & (size - 1);
            while (slots[j]) j = (j + 1) & (size - 1);
            slots[j] = s->slots[i];
        }
        free(s->slots);
        s->slots = slots;
        s->mask = size - 1;
    }
    uintptr_t key = (uintptr_t)p;
    size_t j = (size_t)(key >> 4) * 0x9E3779B97F4A7C15u & s->mask;
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

static PyMethodDef methods[] = {
    {"parameters", parameters, METH_O,
     "parameters(roots) -> (trainable, other): the parameters of every module reachable from roots"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_module_walk", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__module_walk(void) {
    str_parameters = PyUnicode_InternFromString("_parameters");
    str_modules = PyUnicode_InternFromString("_modules");
    str_values = PyUnicode_InternFromString("values");
    str_requires_grad = PyUnicode_InternFromString("requires_grad");
    if (!str_parameters || !str_modules || !str_values || !str_requires_grad) return NULL;
    return PyModule_Create(&module);
}
