// The CPU ops compiled for x86-64-v3 (runtime ISA dispatch): setup.py builds this file
// as kto_torch._C_x86_64_v3 with -march=x86-64-v3; a source of its own gives the copy its
// own object file.
#include "kto_torch.cpp"
