#include <torch/extension.h>

#include "effqat_dequant.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dequant_into", &effqat::dequant_into,
        "effqat: packed int32 W_int -> (W_int - z) * s written into out [N, K]",
        pybind11::arg("packed"), pybind11::arg("zeros"), pybind11::arg("scales"),
        pybind11::arg("out"), pybind11::arg("bits"), pybind11::arg("group_size"));
}
