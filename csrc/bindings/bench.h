// kt_core._C.bench: probes for benchmarks/ and tests, kept out of the product module's surface.
#pragma once

#include <pybind11/pybind11.h>

namespace kt {

// Defines the `bench` submodule of `parent` (kt_core._C); call after ThreadPool is bound.
void bind_bench(pybind11::module_& parent);

}  // namespace kt
