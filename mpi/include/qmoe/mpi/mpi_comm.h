// The processes an MPI launcher started (mpirun, mpiexec, Slurm's srun) as the sw::Comm of the
// compression pipeline (switch/comm.h).
#pragma once

#include <memory>

#include "qmoe/switch/comm.h"

namespace qmoe::mpi {

// Whether this process was started by an MPI launcher: OpenMPI's mpirun (OMPI_COMM_WORLD_SIZE), a
// PMIx launcher such as srun --mpi=pmix (PMIX_RANK) or a PMI one such as MPICH's hydra or srun
// --mpi=pmi2 (PMI_RANK). A process started any other way runs alone, without MPI.
bool launched();

// MPI_Init_thread (only the calling thread makes MPI calls) on first use, and the world as a Comm.
// MPI_Finalize runs at exit. Throws Error when MPI cannot start.
std::shared_ptr<sw::Comm> world();

// Whether world() has started MPI.
bool started();

// Stops every process of the job (MPI_Abort) with this exit code. For a failure that the other
// processes may not see (they could be waiting in a collective).
[[noreturn]] void abort_all(int code);

}  // namespace qmoe::mpi
