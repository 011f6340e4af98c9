// Which instruction set the CPU kernels of float32 run on, chosen once per process: the best this
// CPU runs (x86: avx512 > avx2 > portable; aarch64: neon), or the one pinned by name (the
// DMUP_CPU_ISA environment variable, applied when the Python package is imported). float64 always
// runs the portable kernel; on avx512, small batches run the avx2 one (active_cpu_kernels, cpu_kernels.h).
#pragma once

#include <string>
#include <vector>

namespace dmup {

enum class CpuIsa { Portable, Avx2, Avx512, Neon };

const char* cpu_isa_name(CpuIsa isa);

// The instruction sets this CPU can run, best first.
std::vector<CpuIsa> runnable_cpu_isas();

// The instruction set in use: the best runnable one unless pinned.
CpuIsa active_cpu_isa();

// Pins the instruction set by name ("avx512", "avx2", "neon", "portable"). Throws
// std::invalid_argument for an unknown name and std::runtime_error for one this CPU cannot run.
void pin_cpu_isa(const std::string& name);

}  // namespace dmup
