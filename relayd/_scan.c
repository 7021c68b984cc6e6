/* relayd._scan: the whole-message byte scans of the SMTP paths, at memchr speed.
 *
 * Why C: each of these scans runs on the event loop or in the acceptance path for every
 * message (the end-of-data search, the line-end and line-length checks, dot-stuffing both
 * ways). CPython's bytes.find for a needle of
 * 2 to 5 bytes, bytes.count and re's literal search are byte loops, while glibc's memchr
 * finds the next LF in a few nanoseconds; mail has an LF every line, so stepping from LF
 * to LF and looking at the bytes around it is much faster (docs/performance.md, "Fifth
 * round of the day", has the measurements).
 *
 * Every function has a pure-Python twin in relayd/bytescan.py, used when this module was
 * not built; the tests check that both give the same results.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

/* Offset of the first LF at or after `start` that `prefix` follows within s[0:end], or -1. */
static Py_ssize_t
find_line_in(const char *s, Py_ssize_t start, Py_ssize_t end, const char *prefix,
             Py_ssize_t plen)
{
    /* An LF at i needs i + 1 + plen <= end: search [start, end - plen). */
    Py_ssize_t stop = end - plen;
    const char *p = s + start;
    while (p < s + stop) {
        const char *lf = memchr(p, '\n', (size_t)(s + stop - p));
        if (lf == NULL)
            return -1;
        if (memcmp(lf + 1, prefix, (size_t)plen) == 0)
            return lf - s;
        p = lf + 1;
    }
    return -1;
}

PyDoc_STRVAR(find_line_doc,
"find_line(data, rest, start=0, /) -> int\n\n"
"data.find(b'\\n' + rest, start) for a start of 0 or more.");

static PyObject *
scan_find_line(PyObject *module, PyObject *args)
{
    Py_buffer data, rest;
    Py_ssize_t start = 0;
    if (!PyArg_ParseTuple(args, "y*y*|n:find_line", &data, &rest, &start))
        return NULL;
    Py_ssize_t found = -1;
    if (start < 0) {
        PyErr_SetString(PyExc_ValueError, "find_line: start must not be negative");
        found = -2;
    }
    else if (start < data.len) {
        found = find_line_in(data.buf, start, data.len, rest.buf, rest.len);
    }
    PyBuffer_Release(&data);
    PyBuffer_Release(&rest);
    if (found == -2)
        return NULL;
    return PyLong_FromSsize_t(found);
}

PyDoc_STRVAR(line_ends_ok_doc,
"line_ends_ok(data, /) -> bool\n\n"
"True when every CR in data is followed by an LF and every LF follows a CR.");

static PyObject *
scan_line_ends_ok(PyObject *module, PyObject *arg)
{
    Py_buffer data;
    if (PyObject_GetBuffer(arg, &data, PyBUF_SIMPLE) < 0)
        return NULL;
    const char *s = data.buf, *end = s + data.len, *p;
    int ok = 1;
    for (p = s; ok && (p = memchr(p, '\n', (size_t)(end - p))) != NULL; p++)
        ok = p > s && p[-1] == '\r';
    for (p = s; ok && (p = memchr(p, '\r', (size_t)(end - p))) != NULL; p++)
        ok = p + 1 < end && p[1] == '\n';
    PyBuffer_Release(&data);
    return PyBool_FromLong(ok);
}

PyDoc_STRVAR(has_long_line_doc,
"has_long_line(data, limit, /) -> bool\n\n"
"True when a line of data is longer than limit octets. A line is what lies between LFs;\n"
"the CR of a CRLF does not count (RFC 5322 section 2.1.1: 998 octets excluding the CRLF).");

static PyObject *
scan_has_long_line(PyObject *module, PyObject *args)
{
    Py_buffer data;
    Py_ssize_t limit;
    if (!PyArg_ParseTuple(args, "y*n:has_long_line", &data, &limit))
        return NULL;
    if (limit < 0) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "has_long_line: limit must not be negative");
        return NULL;
    }
    const char *p = data.buf, *end = p + data.len;
    int found = 0;
    /* While what is left could hold a line over the limit: the next LF is looked for only in
     * the next limit + 2 bytes (a longest allowed line, its CR and its LF), so a huge line is
     * not read to its end. */
    while (!found && end - p > limit) {
        Py_ssize_t left = end - p;
        size_t n = left - limit >= 2 ? (size_t)limit + 2 : (size_t)left;
        const char *lf = memchr(p, '\n', n);
        if (lf == NULL) {
            found = 1;  /* more than limit + 1 bytes without an LF, or a last line over it */
        }
        else {
            found = (lf - p) - (lf > p && lf[-1] == '\r') > limit;
            p = lf + 1;
        }
    }
    PyBuffer_Release(&data);
    return PyBool_FromLong(found);
}

/* Whether the LF at lf (inside s[0:end]) ends a CRLF and the next line starts with ".". */
static inline int
dot_after_crlf(const char *s, const char *lf, const char *end)
{
    return lf > s && lf[-1] == '\r' && lf + 1 < end && lf[1] == '.';
}

/* Counts the lines after a CRLF that start with "." (not the first line). */
static Py_ssize_t
count_dot_lines(const char *s, Py_ssize_t n)
{
    const char *end = s + n, *p = s;
    Py_ssize_t count = 0;
    while ((p = memchr(p, '\n', (size_t)(end - p))) != NULL) {
        count += dot_after_crlf(s, p, end);
        p++;
    }
    return count;
}

/* content with one "." added (add) or removed (!add) at the start of every line that
 * starts with one; content itself when no line does. */
static PyObject *
restuff(PyObject *arg, int add, const char *type_error)
{
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, type_error);
        return NULL;
    }
    const char *s = PyBytes_AS_STRING(arg);
    Py_ssize_t n = PyBytes_GET_SIZE(arg);
    int first = n > 0 && s[0] == '.';
    Py_ssize_t dots = count_dot_lines(s, n) + first;
    if (dots == 0)
        return Py_NewRef(arg);
    PyObject *out = PyBytes_FromStringAndSize(NULL, add ? n + dots : n - dots);
    if (out == NULL)
        return NULL;
    char *o = PyBytes_AS_STRING(out);
    const char *end = s + n, *from = s, *p = s;
    if (first && add)
        *o++ = '.';
    else if (first)
        from = s + 1;
    while ((p = memchr(p, '\n', (size_t)(end - p))) != NULL) {
        if (dot_after_crlf(s, p, end)) {
            memcpy(o, from, (size_t)(p + 1 - from));
            o += p + 1 - from;
            if (add)
                *o++ = '.';
            from = add ? p + 1 : p + 2;  /* when removing, past the dot */
        }
        p++;
    }
    memcpy(o, from, (size_t)(end - from));
    return out;
}

PyDoc_STRVAR(stuff_doc,
"stuff(content, /) -> bytes\n\n"
"Dot-stuffing (RFC 5321 section 4.5.2): one more '.' at the start of every line that\n"
"starts with one. Returns content itself when no line does.");

static PyObject *
scan_stuff(PyObject *module, PyObject *arg)
{
    return restuff(arg, 1, "stuff: content must be bytes");
}

PyDoc_STRVAR(unstuff_doc,
"unstuff(data, /) -> bytes\n\n"
"Undoes dot-stuffing: drops the first '.' of every line that starts with one.\n"
"Returns data itself when no line does.");

static PyObject *
scan_unstuff(PyObject *module, PyObject *arg)
{
    return restuff(arg, 0, "unstuff: data must be bytes");
}

static PyMethodDef scan_methods[] = {
    {"find_line", scan_find_line, METH_VARARGS, find_line_doc},
    {"line_ends_ok", scan_line_ends_ok, METH_O, line_ends_ok_doc},
    {"has_long_line", scan_has_long_line, METH_VARARGS, has_long_line_doc},
    {"stuff", scan_stuff, METH_O, stuff_doc},
    {"unstuff", scan_unstuff, METH_O, unstuff_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef scan_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "relayd._scan",
    .m_doc = "The whole-message byte scans of the SMTP paths, at memchr speed.",
    .m_size = 0,
    .m_methods = scan_methods,
};

PyMODINIT_FUNC
PyInit__scan(void)
{
    return PyModuleDef_Init(&scan_module);
}
