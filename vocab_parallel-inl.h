#include <prefopt/vocab_parallel-inl.h>
