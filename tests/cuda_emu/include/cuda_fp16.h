// CPU stand-in for cuda_fp16.h: see emu_float16.h.
#pragma once
#include "emu_float16.h"
