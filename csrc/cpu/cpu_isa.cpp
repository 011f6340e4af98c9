#include "cpu_isa.h"

#include <algorithm>
#include <atomic>
#include <stdexcept>

namespace dmup {

namespace {

constexpr CpuIsa kAllIsas[] = {CpuIsa::Avx512, CpuIsa::Avx2, CpuIsa::Neon, CpuIsa::Portable};

bool cpu_runs(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::Portable: return true;
#if defined(__x86_64__)
    case CpuIsa::Avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma");
    case CpuIsa::Avx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#elif defined(__aarch64__)
    case CpuIsa::Neon: return true;  // part of the AArch64 baseline
#endif
    default: return false;
  }
}

std::atomic<CpuIsa>& active() {
  static std::atomic<CpuIsa> isa{runnable_cpu_isas().front()};
  return isa;
}

}  // namespace

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::Avx512: return "avx512";
    case CpuIsa::Avx2: return "avx2";
    case CpuIsa::Neon: return "neon";
    case CpuIsa::Portable: break;
  }
  return "portable";
}

std::vector<CpuIsa> runnable_cpu_isas() {
  std::vector<CpuIsa> result;
  for (CpuIsa isa : kAllIsas) {
    if (cpu_runs(isa)) result.push_back(isa);
  }
  return result;
}

CpuIsa active_cpu_isa() { return active().load(std::memory_order_relaxed); }

void pin_cpu_isa(const std::string& name) {
  const auto known =
      std::find_if(std::begin(kAllIsas), std::end(kAllIsas), [&](CpuIsa isa) { return name == cpu_isa_name(isa); });
  if (known == std::end(kAllIsas)) {
    throw std::invalid_argument("DMUP_CPU_ISA must be one of 'avx512', 'avx2', 'neon', 'portable'; got '" + name + "'");
  }
  if (!cpu_runs(*known)) {
    std::string runnable;
    for (CpuIsa isa : runnable_cpu_isas()) runnable += std::string(runnable.empty() ? "" : ", ") + cpu_isa_name(isa);
    throw std::runtime_error("DMUP_CPU_ISA='" + name + "': this CPU cannot run " + name + " code; it runs " + runnable);
  }
  active().store(*known, std::memory_order_relaxed);
}

}  // namespace dmup
