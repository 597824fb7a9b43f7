"""How the C++ backend is compiled; shared by setup.py and the JIT loader (no imports on purpose)."""

CPP_SOURCES = ["csrc/concrete_merge.cpp", "csrc/lora_concrete_merge.cpp"]
# -fno-math-errno, with the SIMD declarations in csrc/concrete_merge.cpp, lets GCC call glibc's vector
# log/exp (libmvec); no -ffast-math, which would change rounding and break agreement with other backends.
CPP_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-std=c++20"]
CPP_LINK_FLAGS = ["-fopenmp"]
