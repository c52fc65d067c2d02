# The installed files alone run a whole session: cmake --install to a prefix, a project of one's own with
# find_package(lipforcing) configured and built against it, then run with an empty environment (env -i: no
# LD_LIBRARY_PATH, no PYTHON* variable, no PATH). Its frames (decoded into its own buffer) must equal the build
# tree's (capi_session's, through lf_pop_frame). A consumer written against ABI 0 does not link.
#   cmake -DBUILD=... -DSOURCE=... -DGENERATOR=... -DCLIP=... -P install_consume.cmake
set(prefix ${BUILD}/install-test)
file(REMOVE_RECURSE ${prefix} ${BUILD}/consumer-build)
execute_process(COMMAND ${CMAKE_COMMAND} --install ${BUILD} --prefix ${prefix} RESULT_VARIABLE rc OUTPUT_QUIET)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "cmake --install failed")
endif()
execute_process(COMMAND ${CMAKE_COMMAND} -S ${SOURCE}/native/tests/consumer -B ${BUILD}/consumer-build
                        -G ${GENERATOR} -DCMAKE_PREFIX_PATH=${prefix} -DWITH_STUDENT=${STUDENT}
                        RESULT_VARIABLE rc OUTPUT_VARIABLE out
                        ERROR_VARIABLE out)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "configuring a find_package(lipforcing) project failed:\n${out}")
endif()
execute_process(COMMAND ${CMAKE_COMMAND} --build ${BUILD}/consumer-build RESULT_VARIABLE rc OUTPUT_VARIABLE out
                ERROR_VARIABLE out)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "building it failed:\n${out}")
endif()
# a consumer of ABI 0 is refused at its link (lf_config_init without the struct's size is gone)
execute_process(COMMAND ${CMAKE_COMMAND} --build ${BUILD}/consumer-build --target old_abi_consumer RESULT_VARIABLE rc
                OUTPUT_VARIABLE out ERROR_VARIABLE out)
if(rc EQUAL 0 OR NOT out MATCHES "undefined reference to [`']?lf_config_init[`']?")
  message(FATAL_ERROR "an ABI 0 consumer was not refused at its link (exit ${rc}):\n${out}")
endif()
message("an ABI 0 consumer is refused at its link: undefined lf_config_init")
set(frames ${BUILD}/consumer-build/frames.rgb)
execute_process(COMMAND env -i ${BUILD}/consumer-build/consumer ${CLIP} ${frames} RESULT_VARIABLE rc
                OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "the consumer exited ${rc} under env -i:\n${out}${err}")
endif()
execute_process(COMMAND ${CMAKE_COMMAND} -E compare_files ${frames} ${CLIP}/capi_frames.rgb RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "the installed library's frames differ from the build tree's (${frames}, ${CLIP}/capi_frames.rgb)")
endif()
message("${out}the installed library's frames equal the build tree's")
