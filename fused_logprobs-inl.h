#include <prefopt/fused_logprobs-inl.h>
