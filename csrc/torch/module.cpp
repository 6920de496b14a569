// Makes the op library an importable extension module, hsft._C: importing it loads this shared
// object, whose static initialisers register the hsft ops with torch. It has no Python API.
#include <Python.h>

namespace {
PyModuleDef hsft_ops_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "hsft compiled mask ops; importing registers them as torch.ops.hsft.*",
    -1,
    nullptr,
};
}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&hsft_ops_module); }
