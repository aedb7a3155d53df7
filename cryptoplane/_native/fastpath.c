/*
 * cryptoplane._native._fastpath: Plane.encrypt / Plane.decrypt's fast path, in C.
 *
 * There is no cryptography here.  An AEAD call through `cryptography` costs ~0.4 us;
 * the pure-Python method around it (argument binding, the session test, try, the counter
 * add) costs ~240 ns more, ~85 ns of which is only the Python call.  FastAead is that
 * method's fast path as a method descriptor with vectorcall (PEP 590), so that
 * `plane.encrypt(key, data, nonce=n)` is: bind the arguments, `key._session`, one
 * identity test, the session's stored library method (vectorcall), one counter add.
 *
 * Measured on 3.11, the generic C-API way to do that still costs ~200 ns: about 60 in
 * PyObject_GetAttr on slots and 100 in the counter (two int additions, GetAttr,
 * SetAttr).  Hence the two caches below; with them the overhead is ~95-110 ns, of which
 * ~50 is the second call level itself and ~35 the counter's one int addition.
 *
 * Anything else -- a key not bound to this plane's fast path, padding, argument errors --
 * goes to the pure-Python method it was made from, with the call's arguments untouched,
 * so the two cannot disagree: the Python method is the specification.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *fallback; /* the Python method: slow path, argument errors, __doc__ */
    PyObject *op;       /* "encrypt" | "decrypt", as passed to Plane._fast_error */
    struct SlotCache *fn;    /* Session.enc | dec: (nonce, data, aad) -> bytes */
    struct SlotCache *count; /* Session.c_encrypt | c_decrypt: requests << 64 | bytes */
} FastAead;

/* Interned once: keyword names at call sites are interned too, so binding compares
 * pointers. */
static PyObject *s_session, *s_fast_plane, *s_fast_error;
static PyObject *s_enc, *s_dec, *s_c_encrypt, *s_c_decrypt, *s_encrypt, *s_decrypt;
static PyObject *s_key, *s_data, *s_nonce, *s_aad, *s_padding; /* parameters */
static PyObject *one_request; /* session.ONE_REQUEST, 1 << 64 */

#ifndef Py_T_OBJECT_EX /* 3.11 has only the old names of these */
#define Py_T_OBJECT_EX T_OBJECT_EX
#define Py_READONLY READONLY
#endif

/*
 * Where a __slots__ attribute lives in instances of one type: the C twin of the
 * interpreter's LOAD_ATTR_SLOT specialisation, ~2 ns instead of PyObject_GetAttr's ~20
 * (type lookup, descriptor call).  Key._session and Session's attributes are slots.
 * Valid while the type keeps its tp_version_tag: any change to the class or to one of
 * its bases resets it.  Types it does not apply to (Unbound, a class with its own
 * __getattribute__ or __setattr__, a property) take PyObject_GetAttr/SetAttr.
 */
typedef struct SlotCache {
    PyObject **name;
    int write;          /* also written: the type's setattr must be the generic one */
    PyTypeObject *type; /* strong reference; NULL: nothing cached */
    unsigned int version;
    Py_ssize_t offset;
} SlotCache;

static SlotCache c_session = {.name = &s_session}, c_fast_plane = {.name = &s_fast_plane};
static SlotCache c_enc = {.name = &s_enc}, c_dec = {.name = &s_dec};
static SlotCache c_c_encrypt = {.name = &s_c_encrypt, .write = 1};
static SlotCache c_c_decrypt = {.name = &s_c_decrypt, .write = 1};

/* Not cached yet, or the type changed: find the slot, if it is one.  Out of line. */
static int
slot_fill(SlotCache *c, PyTypeObject *t)
{
    /* a metaclass could answer the lookup below from elsewhere than t's MRO */
    if (!Py_IS_TYPE(t, &PyType_Type) || t->tp_getattro != PyObject_GenericGetAttr
            || (c->write && t->tp_setattro != PyObject_GenericSetAttr)) {
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

/* obj.<name> = v */
static inline int
slot_set(SlotCache *c, PyObject *obj, PyObject *v)
{
    if (slot_cached(c, obj)) { /* what PyMember_SetOne does for T_OBJECT_EX */
        PyObject **p = (PyObject **)((char *)obj + c->offset);
        PyObject *old = *p;
        *p = Py_NewRef(v);
        Py_XDECREF(old);
        return 0;
    }
    return PyObject_SetAttr(obj, *c->name, v);
}

/* len(data) + ONE_REQUEST for the last length seen: a stream of requests of one size
 * (the usual case) then costs one int addition per call instead of two. */
static Py_ssize_t inc_len = -1;
static PyObject *inc_value;

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

    /* s.c_<op> += len(data) + ONE_REQUEST */
    PyObject *count = NULL, *sum = NULL;
    Py_ssize_t n = PyObject_Size(data);
    if (n < 0) {
        goto fail;
    }
    if (n != inc_len) {
        PyObject *len = PyLong_FromSsize_t(n);
        PyObject *inc = len == NULL ? NULL : PyNumber_Add(len, one_request);
        Py_XDECREF(len);
        if (inc == NULL) {
            goto fail;
        }
        Py_XSETREF(inc_value, inc);
        inc_len = n;
    }
    if ((count = slot_get(fa->count, s)) == NULL
            || (sum = PyNumber_Add(count, inc_value)) == NULL
            || slot_set(fa->count, s, sum) < 0) {
        goto fail;
    }
    Py_DECREF(sum);
    Py_DECREF(count);
    Py_DECREF(s);
    return out;

fail:
    Py_XDECREF(sum);
    Py_XDECREF(count);
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
    fa->count = is_enc ? &c_c_encrypt : &c_c_decrypt;
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

static struct PyModuleDef fastpath_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "cryptoplane._native._fastpath",
    .m_doc = "Plane.encrypt/decrypt's fast path as a vectorcall method descriptor.",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__fastpath(void)
{
    struct { PyObject **slot; const char *text; } names[] = {
        {&s_session, "_session"}, {&s_fast_plane, "fast_plane"},
        {&s_fast_error, "_fast_error"}, {&s_enc, "enc"}, {&s_dec, "dec"},
        {&s_c_encrypt, "c_encrypt"}, {&s_c_decrypt, "c_decrypt"},
        {&s_encrypt, "encrypt"}, {&s_decrypt, "decrypt"}, {&s_key, "key"},
        {&s_data, "data"}, {&s_nonce, "nonce"}, {&s_aad, "aad"}, {&s_padding, "padding"},
    };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        if (*names[i].slot == NULL
                && (*names[i].slot = PyUnicode_InternFromString(names[i].text)) == NULL) {
            return NULL;
        }
    }
    if (one_request == NULL) {
        PyObject *one = PyLong_FromLong(1), *shift = PyLong_FromLong(64);
        if (one != NULL && shift != NULL) {
            one_request = PyNumber_Lshift(one, shift);
        }
        Py_XDECREF(one);
        Py_XDECREF(shift);
        if (one_request == NULL) {
            return NULL;
        }
    }
    if (PyType_Ready(&FastAeadType) < 0) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&fastpath_module);
    if (m == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(m, "FastAead", (PyObject *)&FastAeadType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
