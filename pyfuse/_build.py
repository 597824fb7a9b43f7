"""How the C++ backend is compiled; shared by setup.py and the JIT loader (no imports on purpose)."""

CPP_SOURCES = ["csrc/concrete_merge.cpp"]
# -fno-math-errno lets GCC vectorise log/exp through glibc's libmvec; no -ffast-math, which would
# change rounding and break agreement with the other backends.
CPP_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-std=c++17"]
CPP_LINK_FLAGS = ["-fopenmp"]
