// Python entry point of ultra_fast._C. The module itself is empty: importing it loads this
// shared library, whose static initialisers register the ultra_fast ops with the PyTorch
// dispatcher (torch.ops.ultra_fast.*). Built only by setup.py (ULTRA_FAST_PYTHON_MODULE);
// the CMake library for C++ users leaves this file out and needs no Python.
#ifdef ULTRA_FAST_PYTHON_MODULE
#include <Python.h>

extern "C" {
// Limited-API compatible (no pybind11 needed): see setup.py's py_limited_api.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // m_name
      "Native kernels of ultra_fast; ops are exposed as torch.ops.ultra_fast.*",  // m_doc
      -1,    // m_size
      nullptr,  // m_methods
  };
  return PyModule_Create(&module_def);
}
}
#endif
