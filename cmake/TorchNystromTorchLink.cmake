# A pip-installed CUDA torch finds its CUDA libraries (NCCL, cuDNN, ...) in
# site-packages/nvidia/*/lib through its $ORIGIN rpath. The linker of an
# executable does not follow that rpath and may pick another copy (e.g. an
# older /usr/local/cuda/lib/libnccl.so.2 from ld.so.conf), failing with
# "undefined reference to `ncclCommResume'". This returns the link options
# that point it at the wheel's copies; none for a LibTorch zip or a CPU torch.
function(nystrom_torch_link_options out_var torch_library)
  set(_opts "")
  if(torch_library)
    get_filename_component(_lib_dir "${torch_library}" DIRECTORY)
    file(GLOB _dirs LIST_DIRECTORIES true "${_lib_dir}/../../nvidia/*/lib")
    foreach(_dir IN LISTS _dirs)
      if(IS_DIRECTORY "${_dir}")
        get_filename_component(_dir "${_dir}" REALPATH)
        list(APPEND _opts "LINKER:-rpath-link,${_dir}")
      endif()
    endforeach()
  endif()
  set(${out_var} "${_opts}" PARENT_SCOPE)
endfunction()
