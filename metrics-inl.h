#include <prefopt/metrics-inl.h>
