# Included right after llama.cpp's project() (CMAKE_PROJECT_llama.cpp_INCLUDE, scripts/setup.sh):
# llama-cpp-python's CMakeLists forces LLAMA_BUILD_COMMON=ON, but its bindings never load
# libllama-common; skipping it halves the build (83 instead of 140 compile steps).
set(LLAMA_BUILD_COMMON OFF)
