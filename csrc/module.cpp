// The pybind11 module fastssl._C: thin bindings over the launchers of kernels_api.h.
#include <pybind11/pybind11.h>

#include "kernels_api.h"

namespace py = pybind11;
using fastssl::ScoresView;

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastssl native kernels: C++ (OpenMP) on the CPU and CUDA where built with nvcc";
  m.attr("cuda_status") = FASTSSL_CUDA_STATUS;
#ifdef FASTSSL_WITH_CUDA
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif

  py::class_<ScoresView>(m, "ScoresView")
      .def(py::init<uintptr_t, int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>(), py::arg("data"),
           py::arg("dtype"), py::arg("problems"), py::arg("rows"), py::arg("cols"), py::arg("stride_problem"),
           py::arg("stride_row"), py::arg("stride_col"));

  // The kernels touch no Python object: release the GIL while they run.
  const auto no_gil = py::call_guard<py::gil_scoped_release>();
  m.def("sinkhorn_linear_cpu", &fastssl::sinkhorn_linear_cpu, no_gil);
  m.def("sinkhorn_col_lse_cpu", &fastssl::sinkhorn_col_lse_cpu, no_gil);
  m.def("sinkhorn_row_lse_cpu", &fastssl::sinkhorn_row_lse_cpu, no_gil);
  m.def("sinkhorn_write_cpu", &fastssl::sinkhorn_write_cpu, no_gil);
#ifdef FASTSSL_WITH_CUDA
  m.def("sinkhorn_col_lse_cuda", &fastssl::sinkhorn_col_lse_cuda, no_gil);
  m.def("sinkhorn_row_lse_cuda", &fastssl::sinkhorn_row_lse_cuda, no_gil);
  m.def("sinkhorn_write_cuda", &fastssl::sinkhorn_write_cuda, no_gil);
#endif
}
