/*
 * cryptoplane._native._fastpath: Plane.encrypt / Plane.decrypt's fast path, in C, and
 * the sessions' fast-path counters (Tally).
 *
 * There is no cryptography here.  An AEAD call through `cryptography` costs ~0.4 us;
 * the pure-Python method around it (argument binding, the session test, try, the counter
 * add) costs ~240 ns more, ~85 ns of which is only the Python call.  FastAead is that
 * method's fast path as a method descriptor with vectorcall (PEP 590), so that
 * `plane.encrypt(key, data, nonce=n)` is: bind the arguments, `key.session_hint`, one
 * identity test, the session's stored library method (vectorcall), one counter add.
 *
 * Measured on 3.11, the generic C-API way to do that still costs ~200 ns: about 60 in
 * PyObject_GetAttr on slots and 100 in the counter (two int additions, GetAttr,
 * SetAttr).  Hence the slot cache below.  The counter was then still ~35 ns of the
 * remaining ~100: a Python int `requests << 64 | bytes` in a session slot, so every
 * call allocated a multi-digit int for the sum (and, for a new size, the increment).
 * Now a session's counters are a Tally, plain uint64 fields in a C object, and the
 * trampoline adds to them in place: one slot read, an exact type test, two additions,
 * no allocation.  Measured (aes-256-gcm encrypt, 3.11): the overhead over the bare
 * call went from ~115-145 ns to ~45-60, 16 KiB plane/direct from ~0.945 to ~0.975.
 * Under the GIL (held throughout; nothing here releases it) the two additions are
 * atomic with respect to other threads, so counts stay exact.  (This is a
 * single-phase-init module that does not declare Py_mod_gil, so a free-threaded
 * interpreter turns the GIL back on when it is imported.)
 *
 * Anything else -- a key not bound to this plane's fast path, padding, argument errors --
 * goes to the pure-Python method it was made from, with the call's arguments untouched,
 * so the two cannot disagree: the Python method is the specification.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>

/*
 * Tally: one session's fast-path counts, requests and bytes per op, as uint64.
 * The ops and their order are TALLY_OPS; _native/__init__.py holds the same tuple and
 * the pure-Python Tally, and refuses this module if the two differ.  encrypt and
 * decrypt must be 0 and 1: the trampoline adds to those.  2**64 bytes is 16 EiB.
 */
static const char *const TALLY_OPS[] = {
    "encrypt", "decrypt", "sign", "verify", "mac", "encrypt_sectors", "decrypt_sectors",
    "seal_chunks", "open_chunks",
};
#define TALLY_N ((int)(sizeof(TALLY_OPS) / sizeof(TALLY_OPS[0])))
enum { TALLY_ENCRYPT = 0, TALLY_DECRYPT = 1 };

typedef struct {
    PyObject_HEAD
    uint64_t requests[TALLY_N];
    uint64_t bytes[TALLY_N];
} Tally;

static PyTypeObject TallyType;

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *fallback; /* the Python method: slow path, argument errors, __doc__ */
    PyObject *op;       /* "encrypt" | "decrypt", as passed to Plane._fast_error */
    struct SlotCache *fn; /* Session.enc | dec: (nonce, data, aad) -> bytes */
    int index;            /* TALLY_ENCRYPT | TALLY_DECRYPT: where Session.tally counts */
    PyObject *index_obj;  /* the same as an int, for a Tally that is not ours */
} FastAead;

/* Interned once: keyword names at call sites are interned too, so binding compares
 * pointers. */
static PyObject *s_session, *s_fast_plane, *s_fast_error, *s_tally, *s_add;
static PyObject *s_enc, *s_dec, *s_encrypt, *s_decrypt;
static PyObject *s_key, *s_data, *s_nonce, *s_aad, *s_padding; /* parameters */
static PyObject *tally_ops; /* TALLY_OPS as a tuple of str, the module's TALLY_OPS */

#ifndef Py_T_OBJECT_EX /* 3.11 has only the old names of these */
#define Py_T_OBJECT_EX T_OBJECT_EX
#define Py_READONLY READONLY
#endif

/*
 * Where a __slots__ attribute lives in instances of one type: the C twin of the
 * interpreter's LOAD_ATTR_SLOT specialisation, ~2 ns instead of PyObject_GetAttr's ~20
 * (type lookup, descriptor call).  Key.session_hint and Session's attributes are slots.
 * Valid while the type keeps its tp_version_tag: any change to the class or to one of
 * its bases resets it.  Types it does not apply to (Unbound, a class with its own
 * __getattribute__, a property) take PyObject_GetAttr.  Only read: the counters are
 * written inside the Tally, never by rebinding a session attribute.
 */
typedef struct SlotCache {
    PyObject **name;
    PyTypeObject *type; /* strong reference; NULL: nothing cached */
    unsigned int version;
    Py_ssize_t offset;
} SlotCache;

static SlotCache c_session = {.name = &s_session}, c_fast_plane = {.name = &s_fast_plane};
static SlotCache c_enc = {.name = &s_enc}, c_dec = {.name = &s_dec};
static SlotCache c_tally = {.name = &s_tally};

/* Not cached yet, or the type changed: find the slot, if it is one.  Out of line. */
static int
slot_fill(SlotCache *c, PyTypeObject *t)
{
    /* a metaclass could answer the lookup below from elsewhere than t's MRO */
    if (!Py_IS_TYPE(t, &PyType_Type) || t->tp_getattro != PyObject_GenericGetAttr) {
        return 0;
    }
    /* the class attribute, through the MRO: a member descriptor for a slot */
    PyObject *d = PyObject_GetAttr((PyObject *)t, *c->name);
    if (d == NULL) {
        PyErr_Clear(); /* the generic path raises the proper error */
        return 0;
    }
    PyMemberDef *m = Py_IS_TYPE(d, &PyMemberDescr_Type)
        ? ((PyMemberDescrObject *)d)->d_member : NULL;
    int ok = m != NULL && m->type == Py_T_OBJECT_EX && !(m->flags & Py_READONLY)
             && PyType_IsSubtype(t, PyDescr_TYPE(d)) /* the offset is t's layout */
             && t->tp_version_tag != 0; /* the lookup gave the type a valid tag */
    if (ok) {
        Py_XSETREF(c->type, (PyTypeObject *)Py_NewRef(t));
        c->version = t->tp_version_tag;
        c->offset = m->offset;
    }
    else if (c->type == t) {
        Py_CLEAR(c->type);
    }
    Py_DECREF(d);
    return ok;
}

static inline int
slot_cached(SlotCache *c, PyObject *obj)
{
    PyTypeObject *t = Py_TYPE(obj);
    return (t == c->type && t->tp_version_tag == c->version) || slot_fill(c, t);
}

/* obj.<name>, new reference */
static inline PyObject *
slot_get(SlotCache *c, PyObject *obj)
{
    if (slot_cached(c, obj)) {
        PyObject *v = *(PyObject **)((char *)obj + c->offset);
        if (v != NULL) {
            return Py_NewRef(v);
        }
    }
    return PyObject_GetAttr(obj, *c->name); /* also: raises for an empty slot */
}

/* obj.<name>, borrowed (obj keeps it), or NULL, no exception set, if it is not a
 * cached slot or the slot is empty: the caller then takes PyObject_GetAttr. */
static inline PyObject *
slot_peek(SlotCache *c, PyObject *obj)
{
    return slot_cached(c, obj) ? *(PyObject **)((char *)obj + c->offset) : NULL;
}

/*
 * `raise self._fast_error(s, op, e, data, nonce, aad) from None`, from inside
 * `except Exception as e:`.  The exception set by the failed library call is the `e`.
 * Always returns NULL with an exception set.
 */
static PyObject *
raise_fast_error(FastAead *fa, PyObject *self, PyObject *s, PyObject *data,
                 PyObject *nonce, PyObject *aad)
{
    /* `except Exception`: KeyboardInterrupt, SystemExit... pass through unchanged. */
    if (!PyErr_ExceptionMatches(PyExc_Exception)) {
        return NULL;
    }
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *exc = PyErr_GetRaisedException();
#else
    PyObject *type, *exc, *tb;
    PyErr_Fetch(&type, &exc, &tb);
    PyErr_NormalizeException(&type, &exc, &tb);
    if (tb != NULL) { /* `as e` sees e.__traceback__ */
        PyException_SetTraceback(exc, tb);
    }
    Py_XDECREF(type);
    Py_XDECREF(tb);
#endif
    PyObject *args[7] = {self, s, fa->op, exc, data, nonce, aad};
    PyObject *typed = PyObject_VectorcallMethod(s_fast_error, args, 7, NULL);
    if (typed == NULL) {
        Py_DECREF(exc);
        return NULL;
    }
    if (!PyExceptionInstance_Check(typed)) {
        PyErr_SetString(PyExc_TypeError, "exceptions must derive from BaseException");
    }
    else {
        /*
         * `raise typed from None` inside the except block would set __context__ to e
         * (unless typed is e, and cutting any cycle through typed, as CPython does) and
         * __cause__ to None with __suppress_context__.  PyErr_SetObject would chain to
         * the caller's handled exception instead, so chain by hand and restore.
         */
        if (typed != exc) {
            PyObject *o = exc, *slow = exc, *ctx; /* Floyd: the chain may be a loop */
            int toggle = 0;
            while ((ctx = PyException_GetContext(o)) != NULL) {
                Py_DECREF(ctx); /* the chain keeps it alive */
                if (ctx == typed) {
                    PyException_SetContext(o, NULL);
                    break;
                }
                o = ctx;
                if (o == slow) { /* a pre-existing cycle, all of it checked */
                    break;
                }
                if (toggle) {
                    slow = PyException_GetContext(slow);
                    Py_DECREF(slow);
                }
                toggle = !toggle;
            }
            PyException_SetContext(typed, Py_NewRef(exc));
        }
        PyException_SetCause(typed, NULL); /* also sets __suppress_context__ */
        PyErr_Restore(Py_NewRef((PyObject *)Py_TYPE(typed)), Py_NewRef(typed),
                      PyException_GetTraceback(typed));
    }
    Py_DECREF(typed);
    Py_DECREF(exc);
    return NULL;
}

/* `s.tally.add(index, n)` the Python way: s.tally is not exactly a Tally (a pure-Python
 * one, a subclass) or not a cached slot.  Out of line. */
static int
tally_add_generic(FastAead *fa, PyObject *s, Py_ssize_t n)
{
    PyObject *tally = PyObject_GetAttr(s, s_tally);
    if (tally == NULL) {
        return -1;
    }
    PyObject *nbytes = PyLong_FromSsize_t(n);
    if (nbytes == NULL) {
        Py_DECREF(tally);
        return -1;
    }
    PyObject *args[3] = {tally, fa->index_obj, nbytes};
    PyObject *r = PyObject_VectorcallMethod(s_add, args, 3, NULL);
    Py_DECREF(nbytes);
    Py_DECREF(tally);
    Py_XDECREF(r);
    return r == NULL ? -1 : 0;
}

static PyObject *
fastaead_vectorcall(PyObject *callable, PyObject *const *args, size_t nargsf,
                    PyObject *kwnames)
{
    FastAead *fa = (FastAead *)callable;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *self, *key = NULL, *data = NULL, *nonce = Py_None, *aad = Py_None;
    PyObject *padding = NULL;

    /* Bind arguments.  Whatever does not bind simply takes the Python method, which
     * then raises CPython's own TypeError: no messages to keep in step here. */
    switch (nargs) {
    case 6: padding = args[5]; /* fall through */
    case 5: aad = args[4]; /* fall through */
    case 4: nonce = args[3]; /* fall through */
    case 3: data = args[2]; /* fall through */
    case 2: key = args[1]; /* fall through */
    case 1: self = args[0]; break;
    default: goto python;
    }
    if (kwnames != NULL) {
        Py_ssize_t nkw = PyTuple_GET_SIZE(kwnames);
        for (Py_ssize_t j = 0; j < nkw; j++) {
            /* identity: a name that is equal but not interned takes the Python path */
            PyObject *name = PyTuple_GET_ITEM(kwnames, j), *v = args[nargs + j];
            if (name == s_nonce && nargs < 4) {
                nonce = v;
            }
            else if (name == s_aad && nargs < 5) {
                aad = v;
            }
            else if (name == s_padding && nargs < 6) {
                padding = v;
            }
            else if (name == s_data && nargs < 3) {
                data = v;
            }
            else if (name == s_key && nargs < 2) {
                key = v;
            }
            else { /* unknown, or given positionally too */
                goto python;
            }
        }
    }
    if (key == NULL || data == NULL) {
        goto python;
    }

    PyObject *s = slot_get(&c_session, key);
    if (s == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError)) {
            return NULL;
        }
        PyErr_Clear(); /* not a Key: the Python method refuses it (InvalidRequest) */
        goto python;
    }
    PyObject *fast_plane = slot_get(&c_fast_plane, s);
    if (fast_plane == NULL) {
        Py_DECREF(s);
        return NULL;
    }
    Py_DECREF(fast_plane); /* only its identity is used */
    if (fast_plane != self) {
        Py_DECREF(s);
        goto python;
    }
    if (padding != NULL && padding != Py_False) {
        int pad = PyObject_IsTrue(padding);
        if (pad != 0) {
            Py_DECREF(s);
            if (pad < 0) {
                return NULL;
            }
            goto python;
        }
    }

    PyObject *fn = slot_get(fa->fn, s);
    if (fn == NULL) {
        Py_DECREF(s);
        return NULL;
    }
    /* slot 0 spare so that a bound callee may prepend self without copying */
    PyObject *call[4] = {NULL, nonce, data, aad};
    PyObject *out = PyObject_Vectorcall(fn, call + 1, 3 | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                        NULL);
    Py_DECREF(fn);
    if (out == NULL) {
        raise_fast_error(fa, self, s, data, nonce, aad);
        Py_DECREF(s);
        return NULL;
    }

    /* s.tally.add(index, len(data)): in place when it is our Tally (the usual case) */
    Py_ssize_t n = PyBytes_CheckExact(data) ? PyBytes_GET_SIZE(data) : PyObject_Size(data);
    if (n < 0) {
        goto fail;
    }
    PyObject *tally = slot_peek(&c_tally, s);
    if (tally != NULL && Py_IS_TYPE(tally, &TallyType)) { /* exact: no subclass hooks */
        ((Tally *)tally)->requests[fa->index] += 1;
        ((Tally *)tally)->bytes[fa->index] += (uint64_t)n;
    }
    else if (tally_add_generic(fa, s, n) < 0) {
        goto fail;
    }
    Py_DECREF(s);
    return out;

fail:
    Py_DECREF(out);
    Py_DECREF(s);
    return NULL;

python:
    /* The same argument vector, so the flag on it (args[-1] is writable) still holds. */
    return PyObject_Vectorcall(fa->fallback, args, nargsf, kwnames);
}

static PyObject *
fastaead_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"op", "fallback", NULL};
    PyObject *op, *fallback;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "UO:FastAead", kwlist, &op, &fallback)) {
        return NULL;
    }
    int is_enc = PyUnicode_Compare(op, s_encrypt) == 0;
    if (!is_enc && PyUnicode_Compare(op, s_decrypt) != 0) {
        if (!PyErr_Occurred()) {
            PyErr_Format(PyExc_ValueError, "op must be 'encrypt' or 'decrypt', not %R", op);
        }
        return NULL;
    }
    if (!PyCallable_Check(fallback)) {
        PyErr_SetString(PyExc_TypeError, "fallback must be callable");
        return NULL;
    }
    FastAead *fa = (FastAead *)type->tp_alloc(type, 0);
    if (fa == NULL) {
        return NULL;
    }
    fa->vectorcall = fastaead_vectorcall;
    fa->fallback = Py_NewRef(fallback);
    fa->op = Py_NewRef(is_enc ? s_encrypt : s_decrypt);
    fa->fn = is_enc ? &c_enc : &c_dec;
    fa->index = is_enc ? TALLY_ENCRYPT : TALLY_DECRYPT;
    fa->index_obj = PyLong_FromLong(fa->index);
    if (fa->index_obj == NULL) {
        Py_DECREF(fa);
        return NULL;
    }
    return (PyObject *)fa;
}

static int
fastaead_traverse(FastAead *fa, visitproc visit, void *arg)
{
    Py_VISIT(fa->fallback); /* function -> module globals -> class -> us */
    return 0;
}

static int
fastaead_clear(FastAead *fa)
{
    Py_CLEAR(fa->fallback);
    return 0;
}

static void
fastaead_dealloc(FastAead *fa)
{
    PyObject_GC_UnTrack(fa);
    fastaead_clear(fa);
    Py_CLEAR(fa->op);
    Py_CLEAR(fa->index_obj);
    Py_TYPE(fa)->tp_free((PyObject *)fa);
}

/* Like a function: looked up on the class it is itself, on an instance a bound method.
 * (Method calls skip this: Py_TPFLAGS_METHOD_DESCRIPTOR lets LOAD_METHOD pass self.) */
static PyObject *
fastaead_descr_get(PyObject *self, PyObject *obj, PyObject *type)
{
    (void)type;
    if (obj == NULL || obj == Py_None) {
        return Py_NewRef(self);
    }
    return PyMethod_New(self, obj);
}

static PyObject *
fastaead_repr(FastAead *fa)
{
    return PyUnicode_FromFormat("<native fast path of %R>", fa->fallback);
}

/* __doc__, __name__, __qualname__, __module__ are the Python method's, for help(). */
static PyObject *
fastaead_get_wrapped_attr(FastAead *fa, void *name)
{
    if (fa->fallback == NULL) {
        Py_RETURN_NONE;
    }
    return PyObject_GetAttrString(fa->fallback, (const char *)name);
}

static PyGetSetDef fastaead_getset[] = {
    {"__doc__", (getter)fastaead_get_wrapped_attr, NULL, NULL, "__doc__"},
    {"__name__", (getter)fastaead_get_wrapped_attr, NULL, NULL, "__name__"},
    {"__qualname__", (getter)fastaead_get_wrapped_attr, NULL, NULL, "__qualname__"},
    {"__module__", (getter)fastaead_get_wrapped_attr, NULL, NULL, "__module__"},
    {NULL},
};

static PyMemberDef fastaead_members[] = {
    /* inspect.signature() follows __wrapped__ to the Python method's signature */
    {"__wrapped__", T_OBJECT, offsetof(FastAead, fallback), READONLY, NULL},
    {"op", T_OBJECT, offsetof(FastAead, op), READONLY, NULL},
    {NULL},
};

static PyTypeObject FastAeadType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "cryptoplane._native._fastpath.FastAead",
    .tp_basicsize = sizeof(FastAead),
    .tp_dealloc = (destructor)fastaead_dealloc,
    .tp_vectorcall_offset = offsetof(FastAead, vectorcall),
    .tp_repr = (reprfunc)fastaead_repr,
    .tp_call = PyVectorcall_Call,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL
                | Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_traverse = (traverseproc)fastaead_traverse,
    .tp_clear = (inquiry)fastaead_clear,
    .tp_members = fastaead_members,
    .tp_getset = fastaead_getset,
    .tp_descr_get = fastaead_descr_get,
    .tp_new = fastaead_new,
};

/* -- Tally ----------------------------------------------------------------------------- */

static PyObject *
tally_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, ":Tally", kwlist)) {
        return NULL;
    }
    return type->tp_alloc(type, 0); /* zeroed: all counts 0 */
}

/* add(op, nbytes): one request of nbytes for TALLY_OPS[op].  For the Python fast paths
 * (sign, verify, mac, sectors, the slow path); the trampoline adds in place. */
static PyObject *
tally_add(Tally *t, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "add() takes exactly 2 arguments (%zd given)", nargs);
        return NULL;
    }
    Py_ssize_t op = PyLong_AsSsize_t(args[0]);
    if (op == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (op < 0 || op >= TALLY_N) {
        PyErr_SetString(PyExc_IndexError, "Tally op index out of range");
        return NULL;
    }
    unsigned long long n = PyLong_AsUnsignedLongLong(args[1]); /* int >= 0, or raises */
    if (n == (unsigned long long)-1 && PyErr_Occurred()) {
        return NULL;
    }
    /* no Python code and no allocation between reading and writing: atomic under the GIL */
    t->requests[op] += 1;
    t->bytes[op] += (uint64_t)n;
    Py_RETURN_NONE;
}

/* snapshot() -> [(op, requests, bytes)] for every op counted, in TALLY_OPS order */
static PyObject *
tally_snapshot(Tally *t, PyObject *unused)
{
    /* Copy first: building the list allocates, which may run the GC, finalizers, and
     * so other threads; what is returned is then one consistent moment. */
    uint64_t req[TALLY_N], byt[TALLY_N];
    memcpy(req, t->requests, sizeof(req));
    memcpy(byt, t->bytes, sizeof(byt));
    PyObject *out = PyList_New(0);
    if (out == NULL) {
        return NULL;
    }
    for (int i = 0; i < TALLY_N; i++) {
        if (req[i] == 0 && byt[i] == 0) {
            continue;
        }
        PyObject *row = Py_BuildValue("(OKK)", PyTuple_GET_ITEM(tally_ops, i),
                                      (unsigned long long)req[i],
                                      (unsigned long long)byt[i]);
        if (row == NULL || PyList_Append(out, row) < 0) {
            Py_XDECREF(row);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(row);
    }
    return out;
}

static PyMethodDef tally_methods[] = {
    {"add", (PyCFunction)(void (*)(void))tally_add, METH_FASTCALL,
     "add(op, nbytes, /)\n--\n\nCount one request of nbytes for TALLY_OPS[op]."},
    {"snapshot", (PyCFunction)tally_snapshot, METH_NOARGS,
     "snapshot($self, /)\n--\n\n[(op, requests, bytes)] for every op counted."},
    {NULL},
};

static PyTypeObject TallyType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "cryptoplane._native._fastpath.Tally",
    .tp_doc = "Tally()\n--\n\n"
              "A session's fast-path counters: requests and bytes per op of TALLY_OPS, as "
              "uint64 in C,\nso that the trampoline counts without allocating. Final: "
              "the trampoline tests the exact type.",
    .tp_basicsize = sizeof(Tally),
    .tp_flags = Py_TPFLAGS_DEFAULT, /* no GC: holds no references; no subclasses */
    .tp_methods = tally_methods,
    .tp_new = tally_new,
};

static struct PyModuleDef fastpath_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "cryptoplane._native._fastpath",
    .m_doc = "Plane.encrypt/decrypt's fast path as a vectorcall method descriptor, and "
             "Tally, the sessions' fast-path counters.",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__fastpath(void)
{
    struct { PyObject **slot; const char *text; } names[] = {
        {&s_session, "session_hint"}, {&s_fast_plane, "fast_plane"},
        {&s_fast_error, "_fast_error"}, {&s_enc, "enc"}, {&s_dec, "dec"},
        {&s_tally, "tally"}, {&s_add, "add"},
        {&s_encrypt, "encrypt"}, {&s_decrypt, "decrypt"}, {&s_key, "key"},
        {&s_data, "data"}, {&s_nonce, "nonce"}, {&s_aad, "aad"}, {&s_padding, "padding"},
    };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        if (*names[i].slot == NULL
                && (*names[i].slot = PyUnicode_InternFromString(names[i].text)) == NULL) {
            return NULL;
        }
    }
    if (tally_ops == NULL) {
        PyObject *ops = PyTuple_New(TALLY_N);
        for (int i = 0; ops != NULL && i < TALLY_N; i++) {
            PyObject *name = PyUnicode_InternFromString(TALLY_OPS[i]);
            if (name == NULL) {
                Py_CLEAR(ops);
                break;
            }
            PyTuple_SET_ITEM(ops, i, name);
        }
        if (ops == NULL) {
            return NULL;
        }
        tally_ops = ops;
    }
    if (PyType_Ready(&TallyType) < 0) {
        return NULL;
    }
    if (PyType_Ready(&FastAeadType) < 0) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&fastpath_module);
    if (m == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(m, "FastAead", (PyObject *)&FastAeadType) < 0
            || PyModule_AddObjectRef(m, "Tally", (PyObject *)&TallyType) < 0
            || PyModule_AddObjectRef(m, "TALLY_OPS", tally_ops) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
