// The pybind11 module fastssl._C: thin bindings over the launchers of kernels_api.h.
#include <pybind11/pybind11.h>

#include "kernels_api.h"

namespace py = pybind11;
using fastssl::MatricesView;
using fastssl::RowsView;
using fastssl::ScoresView;
using fastssl::SortingNetwork;

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastssl native kernels: C++ (OpenMP) on the CPU and CUDA where built with nvcc";
  m.attr("cuda_status") = FASTSSL_CUDA_STATUS;
#ifdef FASTSSL_WITH_CUDA
  m.attr("has_cuda") = true;
  m.attr("cuda_archs") = FASTSSL_CUDA_ARCHS;  // CMake's list, comma-separated: "75-real,80-real,...,120"
#else
  m.attr("has_cuda") = false;
  m.attr("cuda_archs") = "";
#endif

  py::class_<ScoresView>(m, "ScoresView")
      .def(py::init<uintptr_t, int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>(), py::arg("data"),
           py::arg("dtype"), py::arg("problems"), py::arg("rows"), py::arg("cols"), py::arg("stride_problem"),
           py::arg("stride_row"), py::arg("stride_col"));

  py::class_<SortingNetwork>(m, "SortingNetwork")
      .def(py::init<uintptr_t, int64_t, int64_t, int, float>(), py::arg("codes"), py::arg("layers"), py::arg("wires"),
           py::arg("distribution"), py::arg("art_lambda"));
  py::class_<RowsView>(m, "RowsView")
      .def(py::init<uintptr_t, int, int64_t, int64_t, int64_t, int64_t>(), py::arg("data"), py::arg("dtype"),
           py::arg("rows"), py::arg("n"), py::arg("stride_row"), py::arg("stride_col"));
  py::class_<MatricesView>(m, "MatricesView")
      .def(py::init<uintptr_t, int, int64_t, int64_t, int64_t, int64_t, int64_t>(), py::arg("data"),
           py::arg("dtype"), py::arg("rows"), py::arg("n"), py::arg("stride_row"), py::arg("stride_i"),
           py::arg("stride_j"));

  // The kernels touch no Python object: release the GIL while they run.
  const auto no_gil = py::call_guard<py::gil_scoped_release>();
  m.def("sinkhorn_linear_cpu", &fastssl::sinkhorn_linear_cpu, no_gil);
  m.def("sinkhorn_col_lse_cpu", &fastssl::sinkhorn_col_lse_cpu, no_gil);
  m.def("sinkhorn_row_lse_cpu", &fastssl::sinkhorn_row_lse_cpu, no_gil);
  m.def("sinkhorn_write_cpu", &fastssl::sinkhorn_write_cpu, no_gil);
  m.def("soft_sort_forward_cpu", &fastssl::soft_sort_forward_cpu, no_gil);
  m.def("soft_sort_backward_cpu", &fastssl::soft_sort_backward_cpu, no_gil);
  m.def("neco_loss_forward_cpu", &fastssl::neco_loss_forward_cpu, no_gil);
  m.def("neco_loss_backward_cpu", &fastssl::neco_loss_backward_cpu, no_gil);
#ifdef FASTSSL_WITH_CUDA
  m.def("sinkhorn_col_lse_cuda", &fastssl::sinkhorn_col_lse_cuda, no_gil);
  m.def("sinkhorn_row_lse_cuda", &fastssl::sinkhorn_row_lse_cuda, no_gil);
  m.def("sinkhorn_write_cuda", &fastssl::sinkhorn_write_cuda, no_gil);
  m.attr("soft_sort_max_wires_cuda") = fastssl::SOFT_SORT_MAX_WIRES_CUDA;
  m.def("soft_sort_workspace_floats_cuda", &fastssl::soft_sort_workspace_floats_cuda, no_gil);
  m.def("soft_sort_forward_cuda", &fastssl::soft_sort_forward_cuda, no_gil);
  m.def("soft_sort_backward_cuda", &fastssl::soft_sort_backward_cuda, no_gil);
  m.def("neco_loss_forward_cuda", &fastssl::neco_loss_forward_cuda, no_gil);
  m.def("neco_loss_backward_cuda", &fastssl::neco_loss_backward_cuda, no_gil);
#endif
}
