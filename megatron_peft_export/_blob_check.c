/* The blob check of io/torch_save.py's `_matching_evenly` in C: blobs `step` bytes apart, each compared 8 bytes at a
 * time with a layout's expected words under its mask, over runs of words. `_matching_evenly_numpy` is the reference
 * (the same comparison on numpy views); tests/io/test_torch_save_bulk.py pins that both give the same answer.
 *
 * words_match(data, origin, step, count, expected, mask, runs) -> bytearray of `count` bytes, 1 where blob n's words
 * (8-byte words from byte origin + n * step of `data`) xor `expected`, and `mask`, are zero at every word of every run
 * (a, b) (words a to b - 1), else 0. Every word read is checked to lie inside `data` before anything is read. The GIL
 * is released during the comparison. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static PyObject *words_match(PyObject *self, PyObject *args) {
    Py_buffer data, expected, mask, runs;
    Py_ssize_t origin, step, count;
    if (!PyArg_ParseTuple(args, "y*nnny*y*y*:words_match", &data, &origin, &step, &count, &expected, &mask, &runs))
        return NULL;
    PyObject *out = NULL;
    Py_ssize_t words = expected.len / 8, pairs = runs.len / 16;
    const char *why = NULL;
    if (expected.len % 8 || mask.len != expected.len || runs.len % 16)
        why = "expected and mask are as many 8-byte words, and runs are pairs of 8-byte integers";
    else if (origin < 0 || step < 0 || count < 0)
        why = "origin, step and count are not negative";
    const int64_t *pair = runs.buf;
    Py_ssize_t widest = 0; /* the end of the last word read in a blob */
    for (Py_ssize_t r = 0; why == NULL && r < pairs; r++) {
        if (pair[2 * r] < 0 || pair[2 * r] >= pair[2 * r + 1] || pair[2 * r + 1] > words)
            why = "each run (a, b) has 0 <= a < b <= the number of words";
        else if (8 * (Py_ssize_t)pair[2 * r + 1] > widest)
            widest = 8 * (Py_ssize_t)pair[2 * r + 1];
    }
    /* the last blob's last word inside data: origin + (count - 1) * step + widest <= len, without overflow */
    if (why == NULL && count > 0 && pairs > 0) {
        Py_ssize_t room = data.len - widest - origin;
        if (room < 0 || (step > 0 && count - 1 > room / step)) why = "every blob's words lie inside the data";
    }
    if (why != NULL) {
        PyErr_SetString(PyExc_ValueError, why);
        goto done;
    }
    out = PyByteArray_FromStringAndSize(NULL, count);
    if (out == NULL) goto done;
    unsigned char *found = (unsigned char *)PyByteArray_AS_STRING(out);
    const unsigned char *base = (const unsigned char *)data.buf + origin;
    const unsigned char *want = expected.buf, *keep = mask.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t n = 0; n < count; n++) {
        const unsigned char *blob = base + n * step;
        uint64_t differ = 0;
        for (Py_ssize_t r = 0; r < pairs && !differ; r++) {
            for (Py_ssize_t w = pair[2 * r]; w < pair[2 * r + 1]; w++) {
                uint64_t x, e, m;
                memcpy(&x, blob + 8 * w, 8);
                memcpy(&e, want + 8 * w, 8);
                memcpy(&m, keep + 8 * w, 8);
                differ |= (x ^ e) & m;
            }
        }
        found[n] = differ == 0;
    }
    Py_END_ALLOW_THREADS
done:
    PyBuffer_Release(&data);
    PyBuffer_Release(&expected);
    PyBuffer_Release(&mask);
    PyBuffer_Release(&runs);
    return out;
}

static PyMethodDef methods[] = {
    {"words_match", words_match, METH_VARARGS,
     "words_match(data, origin, step, count, expected, mask, runs): per blob, 1 when its masked words are expected."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_blob_check", NULL, -1, methods};

PyMODINIT_FUNC PyInit__blob_check(void) { return PyModule_Create(&module); }
