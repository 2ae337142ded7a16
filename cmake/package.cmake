# `cmake --install build --prefix P` and `cpack` (a .deb): the three programs in P/bin (aviary
# runs aviary-worker from its own folder), configs/ and deploy/ in P/share/aviary, the docs in
# P/share/doc/aviary, and in P/share/aviary/systemd the systemd units and their environment
# files rewritten for the .deb's paths (below). Tests and benchmarks are not installed.
include(GNUInstallDirs)
install(TARGETS aviary aviary-worker aviary-coordinator RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
# `aviary completion bash`, written at build time, where bash-completion looks for it.
set(AVIARY_COMPLETION ${CMAKE_BINARY_DIR}/completion/aviary)
add_custom_command(OUTPUT ${AVIARY_COMPLETION}
  COMMAND ${CMAKE_COMMAND} -E make_directory ${CMAKE_BINARY_DIR}/completion
  COMMAND ${CMAKE_COMMAND} -DAVIARY=$<TARGET_FILE:aviary> -DOUT=${AVIARY_COMPLETION}
          -P ${PROJECT_SOURCE_DIR}/cmake/completion.cmake
  DEPENDS aviary
  COMMENT "bash completion of aviary")
add_custom_target(aviary_bash_completion ALL DEPENDS ${AVIARY_COMPLETION})
install(FILES ${AVIARY_COMPLETION} DESTINATION ${CMAKE_INSTALL_DATADIR}/bash-completion/completions)
install(DIRECTORY ${PROJECT_SOURCE_DIR}/configs/ DESTINATION ${CMAKE_INSTALL_DATADIR}/aviary/configs)
install(DIRECTORY ${PROJECT_SOURCE_DIR}/deploy/ DESTINATION ${CMAKE_INSTALL_DATADIR}/aviary/deploy
        USE_SOURCE_PERMISSIONS)
install(FILES ${PROJECT_SOURCE_DIR}/README.md ${PROJECT_SOURCE_DIR}/docs/SERVICE.md
              ${PROJECT_SOURCE_DIR}/docs/DEPLOY.md ${PROJECT_SOURCE_DIR}/docs/BENCHMARKS.md
              ${PROJECT_SOURCE_DIR}/docs/INFERENCE.md
        DESTINATION ${CMAKE_INSTALL_DOCDIR})
# deploy/systemd/ names the hand-made layout (/opt/aviary/bin, /opt/aviary/deploy,
# /opt/aviary/docs); the .deb's copies name where the .deb puts those files: /usr/bin,
# /usr/share/aviary/deploy, /usr/share/doc/aviary, and their comments /usr/share/aviary/systemd.
# Written for the prefix /usr (the .deb's, CPACK_PACKAGING_INSTALL_PREFIX) whatever --prefix
# installs them. Shipped, never enabled: the operator copies them to /etc/systemd/system
# (docs/DEPLOY.md, "Install layouts").
set(AVIARY_PACKAGE_PREFIX /usr)
foreach(_file aviary-coordinator.service aviary-worker-group@.service coordinator.env.example
              worker-group.env.example)
  set(_source ${PROJECT_SOURCE_DIR}/deploy/systemd/${_file})
  set_property(DIRECTORY APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS ${_source})
  file(READ ${_source} _text)
  # The worker env file's PATH starts with /opt/aviary/bin: /usr/bin is on it already.
  string(REPLACE "/opt/aviary/bin:" "" _text "${_text}")
  string(REPLACE "/opt/aviary/bin/" "${AVIARY_PACKAGE_PREFIX}/${CMAKE_INSTALL_BINDIR}/" _text "${_text}")
  string(REPLACE "/opt/aviary/deploy/" "${AVIARY_PACKAGE_PREFIX}/${CMAKE_INSTALL_DATADIR}/aviary/deploy/" _text "${_text}")
  string(REPLACE "/opt/aviary/docs/" "${AVIARY_PACKAGE_PREFIX}/${CMAKE_INSTALL_DOCDIR}/" _text "${_text}")
  string(REPLACE " deploy/systemd/" " ${AVIARY_PACKAGE_PREFIX}/${CMAKE_INSTALL_DATADIR}/aviary/systemd/" _text "${_text}")
  file(WRITE ${CMAKE_BINARY_DIR}/systemd/${_file} "${_text}")
  install(FILES ${CMAKE_BINARY_DIR}/systemd/${_file} DESTINATION ${CMAKE_INSTALL_DATADIR}/aviary/systemd)
endforeach()

set(CPACK_PACKAGE_NAME aviary)
set(CPACK_PACKAGE_VENDOR "aviary")
set(CPACK_PACKAGE_CONTACT "aviary maintainers <aviary@localhost>")
set(CPACK_PACKAGE_DESCRIPTION_SUMMARY
    "distributed multi-GPU training service for bird-call classifiers (BirdCLEF recipe)")
set(CPACK_PACKAGE_VERSION ${PROJECT_VERSION})
set(CPACK_GENERATOR DEB)
set(CPACK_STRIP_FILES ON)
set(CPACK_PACKAGING_INSTALL_PREFIX ${AVIARY_PACKAGE_PREFIX})
set(CPACK_DEBIAN_FILE_NAME DEB-DEFAULT)
set(CPACK_DEBIAN_PACKAGE_SECTION science)
set(CPACK_DEBIAN_COMPRESSION_TYPE gzip)  # xz takes minutes on 2 cores for ~50 MB
# The shared libraries' packages come from dpkg-shlibdeps (libtorch1.13, libgrpc++1.51,
# libcairo2, ...); mpirun is a program and the plots' font a data file, declared by hand. A libtorch from a PyPI wheel has no Debian package:
# the CUDA configuration is not packaged this way (docs/DEPLOY.md, "Building on a GPU host").
set(CPACK_DEBIAN_PACKAGE_SHLIBDEPS ON)
# libjs-dygraphs: the web console's charts, served from /usr/share/javascript at run time.
set(CPACK_DEBIAN_PACKAGE_DEPENDS "openmpi-bin, fonts-dejavu-core, libjs-dygraphs")
set(CPACK_DEBIAN_PACKAGE_SUGGESTS "prometheus")
include(CPack)
