# Cross-compiles kto's CPU tests for 64-bit Arm with Debian's g++-aarch64-linux-gnu; the
# test programs run under qemu-aarch64-static (Debian's qemu-user-static), which CTest
# and try_run call through CMAKE_CROSSCOMPILING_EMULATOR. scripts/isa_matrix.sh uses it.
# Eigen and Catch2 are header-only: the build machine's headers serve the target too.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE BOTH)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE BOTH)
set(CMAKE_CROSSCOMPILING_EMULATOR qemu-aarch64-static -L /usr/aarch64-linux-gnu)
