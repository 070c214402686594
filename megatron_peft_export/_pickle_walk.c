/* check_pickle's walk in C (the walk itself: _pickle_walk.h, shared with the `.metadata` reader _dcp_metadata.c).
 * walk(data, tables) -> None when the pickle passes, else (code, byte, value, value) as torch_save._message words
 * it. The GIL is released during the walk. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "_pickle_walk.h"

static PyObject *walk(PyObject *self, PyObject *args) {
    Py_buffer data, table;
    if (!PyArg_ParseTuple(args, "y*y*:walk", &data, &table)) return NULL;
    if (table.len != WALK_TABLES_LEN) {
        PyBuffer_Release(&data);
        PyBuffer_Release(&table);
        PyErr_SetString(PyExc_ValueError, "the opcode tables have 2048 bytes");
        return NULL;
    }
    WalkRefusal out;
    Walk w;
    walk_begin(&w, data.buf, data.len, table.buf, &out);
    int result;
    Py_BEGIN_ALLOW_THREADS
    while ((result = walk_step(&w)) == WALK_OK)
        ;
    Py_END_ALLOW_THREADS
    walk_free(&w);
    PyBuffer_Release(&data);
    PyBuffer_Release(&table);
    if (result == WALK_NO_MEMORY) return PyErr_NoMemory();
    if (result == WALK_DONE) Py_RETURN_NONE;
    return walk_refusal_tuple(&out);
}

static PyMethodDef methods[] = {
    {"walk", walk, METH_VARARGS, "check_pickle's walk (io/torch_save.py): None, or (code, byte, value, value)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_pickle_walk", NULL, -1, methods};

PyMODINIT_FUNC PyInit__pickle_walk(void) { return PyModule_Create(&module); }
